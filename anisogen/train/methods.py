"""Training methods and post-processing steps: the trainer's extension point.

A **method** decides what trains. It is a function ``prepare(ctx: MethodContext) -> MethodSetup`` that
may modify ``ctx.model`` (wrap ``model.lm`` with PEFT, attach modules under ``model.extras``, set
``requires_grad``) and returns the optimizer parameter groups. The loop never needs to know which
method runs: it optimises the groups, checkpoints every parameter with ``requires_grad``, and at the
end calls the method's ``export`` hook; inference calls its ``load`` hook on a fresh model.

A **post-processor** runs after the final export (e.g. APP projector merging) and may write more
exports with ``ctx.write_export``.

Register from your own module, then make sure it is imported (modules listed in ``PLUGIN_MODULES``
are imported automatically when present)::

    from anisogen.train.methods import register_method, MethodSetup, ParamGroup, projector_groups

    def prepare(ctx):
        ...                                   # modify ctx.model
        return MethodSetup(groups=projector_groups(ctx) + [ParamGroup("adapter", params, role="adapter")])

    register_method("my_method", prepare, options={"r": (1, "rank")}, description="...")

Built-ins: ``projector`` (LM frozen, projector trains), ``full`` (LM and projector train), ``lora``
(PEFT LoRA on the LM; projector trains unless ``--freeze-projector``).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

#: Modules imported by :func:`load_plugins` when they exist (issue 8 registers APP, Gap-Init, MoReS).
PLUGIN_MODULES = ("anisogen.train.app", "anisogen.train.gap_init", "anisogen.train.mores")


@dataclass
class MethodContext:
    """What a method's ``prepare`` gets.

    ``model``: the :class:`~anisogen.train.model.EmbeddingLM` (LM frozen, projector trainable, on
    ``device``). ``options``: this method's options, defaults merged with ``--opt key=value``.
    ``calibration(n)``: up to ``n`` training examples as collated batches (eval-mode transform, no
    noise), for data-dependent initialisation. ``resuming``: True when a checkpoint will overwrite the
    trainable tensors right after ``prepare`` (expensive initialisation may be skipped, but the module
    structure must be identical). ``log(msg)`` prints on the main process.
    """

    model: Any
    tokenizer: Any
    config: Any
    options: dict
    device: torch.device
    is_main: bool = True
    resuming: bool = False
    calibration: Callable[[int], list[dict]] | None = None
    log: Callable[[str], None] = print


@dataclass
class ParamGroup:
    """An optimizer group. ``role`` picks the default lr: ``projector`` -> ``--lr``,
    ``adapter`` -> ``--adapter-lr``; ``lr``/``weight_decay`` override the defaults."""

    name: str
    params: list
    role: str = "adapter"
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class MethodSetup:
    """What ``prepare`` returns: parameter groups and a JSON-able ``info`` dict (logged, exported)."""

    groups: list[ParamGroup]
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    prepare: Callable[[MethodContext], MethodSetup]
    export: Callable[[Any, Path, dict], None] | None = None  # (model, export_dir, method_info)
    load: Callable[[Any, Path, dict], None] | None = None  # (model, export_dir, export_config)
    options: dict = field(default_factory=dict)  # name -> (default, help)
    trains_lm_weights: bool = False  # LM weights change: kept fp32, saved in the export
    description: str = ""


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    prepare: Callable[[MethodContext], MethodSetup],
    *,
    export=None,
    load=None,
    options: dict | None = None,
    trains_lm_weights: bool = False,
    description: str = "",
) -> Method:
    """Register a training method (see module docstring). Re-registering the same function is a no-op."""
    if name in METHODS and METHODS[name].prepare is not prepare:
        raise ValueError(f"method {name!r} is already registered")
    m = Method(name, prepare, export, load, dict(options or {}), trains_lm_weights, description)
    METHODS[name] = m
    return m


@dataclass
class PostContext:
    """What a post-processor gets. ``initial_trainable``: CPU float32 copies of the trainable tensors
    right after ``prepare`` and before the first step (e.g. the stage-1 projector, APP's θ_pre);
    ``write_export(dir, projector_state=None, extra_config=None)`` writes a complete export of the
    current model with an optional projector state-dict override and returns its path."""

    model: Any
    tokenizer: Any
    config: Any
    export_dir: Path
    output_dir: Path
    initial_trainable: dict
    write_export: Callable[..., Path]
    log: Callable[[str], None] = print


@dataclass
class PostProcessor:
    name: str
    run: Callable[[PostContext, str], dict]  # (ctx, spec string) -> JSON-able report
    description: str = ""


POSTPROCESSORS: dict[str, PostProcessor] = {}


def register_postprocessor(name: str, run: Callable[[PostContext, str], dict], *, description: str = "") -> PostProcessor:
    """Register a step run after the final export as ``--post NAME[:SPEC]``."""
    if name in POSTPROCESSORS and POSTPROCESSORS[name].run is not run:
        raise ValueError(f"post-processor {name!r} is already registered")
    POSTPROCESSORS[name] = PostProcessor(name, run, description)
    return POSTPROCESSORS[name]


#: module -> import error of plugins that failed to import (reported when their names are requested).
PLUGIN_ERRORS: dict[str, str] = {}


def load_plugins() -> None:
    """Import the optional method modules in :data:`PLUGIN_MODULES` that exist.

    A plugin that fails to import does not break the other methods: a warning is emitted and the
    error is repeated when one of its names is requested (``get_method``/``get_postprocessor``).
    """
    for mod in PLUGIN_MODULES:
        if mod in PLUGIN_ERRORS or importlib.util.find_spec(mod) is None:
            continue
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - reported, see docstring
            PLUGIN_ERRORS[mod] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"method plugin {mod} failed to import: {PLUGIN_ERRORS[mod]}", RuntimeWarning, stacklevel=2)


def _unknown(kind: str, name: str, known) -> ValueError:
    extra = "".join(f"; plugin {m} failed to import ({e})" for m, e in PLUGIN_ERRORS.items())
    return ValueError(f"unknown {kind} {name!r}; registered: {sorted(known) or 'none'}{extra}")


def get_method(name: str) -> Method:
    load_plugins()
    if name not in METHODS:
        raise _unknown("method", name, METHODS)
    return METHODS[name]


def get_postprocessor(name: str) -> PostProcessor:
    load_plugins()
    if name not in POSTPROCESSORS:
        raise _unknown("post-processor", name, POSTPROCESSORS)
    return POSTPROCESSORS[name]


def parse_options(method: Method, items: list[str] | dict | None) -> dict:
    """Merge ``key=value`` strings (or a dict) into the method's defaults, typed like the default.

    Booleans accept true/false/1/0/yes/no; list/tuple defaults split on commas. Unknown keys raise.
    """
    opts = {k: v[0] for k, v in method.options.items()}
    if not items:
        return opts
    pairs = items.items() if isinstance(items, dict) else [_split_kv(s) for s in items]
    for key, raw in pairs:
        if key not in method.options:
            raise ValueError(f"method {method.name!r} has no option {key!r}; options: {sorted(method.options) or 'none'}")
        default = method.options[key][0]
        opts[key] = _coerce(raw, default, key)
    return opts


def _split_kv(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise ValueError(f"method option {s!r} must be key=value")
    k, v = s.split("=", 1)
    return k.strip(), v.strip()


def _coerce(raw, default, key):
    if not isinstance(raw, str):
        return raw
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"option {key}: expected a boolean, got {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, (list, tuple)):
        return [x.strip() for x in raw.split(",") if x.strip()]
    return raw


def options_help() -> str:
    """Text listing methods, their options and post-processors (for ``--help``)."""
    load_plugins()
    lines = ["methods:"]
    for m in METHODS.values():
        lines.append(f"  {m.name}: {m.description}")
        for k, (d, h) in m.options.items():
            lines.append(f"      --opt {k}=VALUE  {h} (default {d!r})")
    lines.append("post-processors (--post NAME[:SPEC]):")
    for p in POSTPROCESSORS.values():
        lines.append(f"  {p.name}: {p.description}")
    if not POSTPROCESSORS:
        lines.append("  (none registered)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Helpers for method authors


def projector_groups(ctx: MethodContext) -> list[ParamGroup]:
    """The projector's group, or [] (with its parameters frozen) under ``--freeze-projector``."""
    params = list(ctx.model.projector.parameters())
    if getattr(ctx.config, "freeze_projector", False):
        for p in params:
            p.requires_grad_(False)
        return []
    for p in params:
        p.requires_grad_(True)
    return [ParamGroup("projector", params, role="projector")]


def layer_index(module_name: str) -> int | None:
    """Decoder layer index parsed from a module name (``...layers.7.self_attn.q_proj`` -> 7)."""
    parts = module_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def num_decoder_layers(lm) -> int:
    cfg = getattr(lm, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise ValueError("cannot tell the number of decoder layers of this LM (config.num_hidden_layers)")
    return int(n)


# --------------------------------------------------------------------------------------------------
# Built-in methods


def _prepare_projector(ctx: MethodContext) -> MethodSetup:
    ctx.model.freeze_lm()
    groups = projector_groups(ctx)
    return MethodSetup(groups=groups, info={"lm": "frozen"})


def _prepare_full(ctx: MethodContext) -> MethodSetup:
    lm_params = []
    for p in ctx.model.lm.parameters():
        p.requires_grad_(True)
        lm_params.append(p)
    return MethodSetup(groups=projector_groups(ctx) + [ParamGroup("lm", lm_params, role="adapter")],
                       info={"lm": "full"})


def _lora_config(ctx: MethodContext):
    from peft import LoraConfig

    o = ctx.options
    layers = None
    if o["last_layers"] > 0:
        n = num_decoder_layers(ctx.model.lm)
        layers = list(range(max(0, n - o["last_layers"]), n))
    return LoraConfig(
        r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"], target_modules=list(o["targets"]),
        layers_to_transform=layers, bias="none", task_type="CAUSAL_LM",
    )


def _prepare_lora(ctx: MethodContext) -> MethodSetup:
    from peft import get_peft_model

    ctx.model.freeze_lm()
    ctx.model.lm = get_peft_model(ctx.model.lm, _lora_config(ctx))
    adapters = [p for n, p in ctx.model.lm.named_parameters() if "lora_" in n]
    for p in adapters:
        p.requires_grad_(True)
    if not adapters:
        raise ValueError(f"LoRA targets {ctx.options['targets']} matched no module of the LM")
    n_adapter = sum(p.numel() for p in adapters)
    ctx.log(f"lora: {n_adapter} adapter parameters (r={ctx.options['r']}, targets={ctx.options['targets']})")
    return MethodSetup(groups=projector_groups(ctx) + [ParamGroup("adapter", adapters, role="adapter")],
                       info={"lm": "lora", "adapter_parameters": n_adapter})


def export_peft_adapter(model, export_dir: Path, info: dict) -> None:
    """Write ``export_dir/adapter`` with PEFT's ``save_pretrained`` (safetensors)."""
    model.lm.save_pretrained(str(Path(export_dir) / "adapter"), safe_serialization=True)


def load_peft_adapter(model, export_dir: Path, config: dict) -> None:
    """Wrap ``model.lm`` with the adapter saved by :func:`export_peft_adapter`."""
    from peft import PeftModel

    model.lm = PeftModel.from_pretrained(model.lm, str(Path(export_dir) / "adapter"))


LORA_OPTIONS = {
    "r": (8, "LoRA rank"),
    "alpha": (16, "LoRA alpha (scaling alpha/r)"),
    "dropout": (0.05, "LoRA dropout"),
    "targets": (["q_proj", "k_proj", "v_proj", "o_proj"], "comma-separated target module names"),
    "last_layers": (0, "adapt only the last N decoder layers (0 = all)"),
}

register_method("projector", _prepare_projector, description="train the projector only; the LM stays frozen (stage 1, APP)")
register_method("full", _prepare_full, trains_lm_weights=True,
                description="train the whole LM (lr --adapter-lr) and the projector (lr --lr)")
register_method("lora", _prepare_lora, export=export_peft_adapter, load=load_peft_adapter, options=LORA_OPTIONS,
                description="PEFT LoRA on the LM (lr --adapter-lr) plus the projector (lr --lr)")
