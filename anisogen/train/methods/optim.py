"""From a method's parameter groups to torch optimizer groups, with per-method, per-stage defaults.

The trainer calls :func:`optimizer_groups` once after the method's ``prepare``. For every
:class:`~.registry.ParamGroup` it resolves the learning rate and weight decay (pinned on the group >
explicit ``TrainConfig`` value > the method's default for the stage, :mod:`.defaults`) and splits the
group into the tensors that decay and those that never do, following the rule of HF Trainer's
``get_decay_parameter_names``: biases and normalisation weights (``LayerNorm``/``RMSNorm``/any
``*Norm`` module, or a name matching ``bias``/``layernorm``/``rmsnorm``/``norm``) get no weight decay;
we also exempt every tensor with fewer than 2 dimensions (scales, gates, learned offsets).
"""

from __future__ import annotations

import re

from torch import nn

from .defaults import STAGES, resolve

#: Parameter-name patterns without weight decay (HF Trainer.get_decay_parameter_names, lower-cased names).
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                  r"_norm(?:$|\.)"))

#: ParamGroup.role -> the default key of its learning rate.
ROLE_LR = {"projector": "projector_lr", "adapter": "adapter_lr"}

NO_DECAY_SOURCE = "no decay: bias / normalisation weight / tensor with ndim < 2 (HF Trainer rule)"


def _is_norm(module: nn.Module) -> bool:
    norm_types = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
                                   nn.modules.batchnorm._NormBase) if t is not None)
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm")


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``named_parameters``) of the parameters that must not get weight decay."""
    out = set()
    for mname, mod in model.named_modules():
        if _is_norm(mod):
            out.update(f"{mname}.{n}" if mname else n for n, _ in mod.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        if p.ndim < 2 or any(pat.search(name.lower()) for pat in NO_DECAY_PATTERNS):
            out.add(name)
    return out


def optimizer_groups(model: nn.Module, setup, method, cfg, *, stage: str) -> tuple[list[dict], dict]:
    """Torch param-group dicts and a JSON-able description of them.

    Args:
        model: the model after ``method.prepare`` (parameter names and modules decide what decays).
        setup: the :class:`~.registry.MethodSetup` returned by ``prepare``.
        method: the :class:`~.registry.Method` (its ``defaults``).
        cfg: the run's ``TrainConfig`` (``lr``, ``adapter_lr``, ``weight_decay``, ``freeze_projector``:
            None = method default).
        stage: ``stage1`` (shards + plain captions) or ``stage2`` (JSONL conversations).
    Returns:
        ``(groups, description)``. ``groups``: ``[{"params", "lr", "weight_decay", "name"}]``; a
        ParamGroup whose weight decay is > 0 becomes ``NAME`` (matrices) and ``NAME.no_decay``
        (biases, norms, 1-D tensors); with 0 it stays one group. Groups with no trainable parameter
        are dropped. ``description``: ``{"method", "stage", "freeze_projector": {value, source},
        "groups": [{name, group, role, lr, lr_source, weight_decay, weight_decay_source, n_params,
        n_tensors}]}``.
    Raises:
        ValueError (one line, naming the method): a parameter in two groups (or twice in one), a
        trainable parameter outside every group, an unknown role, no trainable parameter at all.
    """
    mname = getattr(method, "name", "?")
    if stage not in STAGES:
        raise ValueError(f"method {mname!r}: stage must be one of {STAGES}, got {stage!r}")
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    no_decay = no_decay_parameter_names(model)
    wd_default, wd_default_src = resolve(method, "weight_decay", cfg, stage)
    freeze, freeze_src = resolve(method, "freeze_projector", cfg, stage)
    seen: dict[int, str] = {}
    groups: list[dict] = []
    described: list[dict] = []
    for g in setup.groups:
        if g.role not in ROLE_LR:
            raise ValueError(
                f"method {mname!r}: group {g.name!r} has role {g.role!r}; expected one of {sorted(ROLE_LR)}"
            )
        params = [p for p in g.params if p.requires_grad]
        for p in params:
            if id(p) in seen:
                where = "twice in group" if seen[id(p)] == g.name else f"in groups {seen[id(p)]!r} and"
                raise ValueError(f"method {mname!r}: parameter {names.get(id(p), '<unnamed>')} is {where} {g.name!r}")
            seen[id(p)] = g.name
        if not params:
            continue
        if g.lr is not None:
            lr, lr_src = float(g.lr), f"pinned by method {mname!r} on group {g.name!r}"
        else:
            lr, lr_src = resolve(method, ROLE_LR[g.role], cfg, stage)
        if g.weight_decay is not None:
            parts = [(g.name, params, float(g.weight_decay), f"pinned by method {mname!r} on group {g.name!r}")]
        elif float(wd_default) == 0.0:
            parts = [(g.name, params, 0.0, wd_default_src)]
        else:
            def decays(p):
                n = names.get(id(p))
                return p.ndim >= 2 and n not in no_decay
            parts = [(g.name, [p for p in params if decays(p)], float(wd_default), wd_default_src),
                     (f"{g.name}.no_decay", [p for p in params if not decays(p)], 0.0, NO_DECAY_SOURCE)]
        for name, ps, wd, wd_src in parts:
            if not ps:
                continue
            groups.append({"params": ps, "lr": float(lr), "weight_decay": wd, "name": name})
            described.append({"name": name, "group": g.name, "role": g.role, "lr": float(lr), "lr_source": lr_src,
                              "weight_decay": wd, "weight_decay_source": wd_src,
                              "n_params": int(sum(p.numel() for p in ps)), "n_tensors": len(ps)})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"method {mname!r}: trainable parameters outside every group: {missing[:3]}{more}")
    if not groups:
        raise ValueError(f"method {mname!r} left no trainable parameter (is everything frozen?)")
    desc = {"method": mname, "stage": stage, "freeze_projector": {"value": bool(freeze), "source": freeze_src},
            "groups": described}
    return groups, desc
