"""The registries of training methods and post-processors, and the helpers method authors use.

A **method** decides what trains. It is a function ``prepare(ctx: MethodContext) -> MethodSetup``
that may modify ``ctx.model`` (wrap ``model.lm`` with PEFT, attach modules under ``model.extras``,
set ``requires_grad``) and returns parameter groups tagged with a *role*. The loop never needs to
know which method runs: :func:`~.optim.optimizer_groups` turns the groups into optimizer groups with
the method's per-stage defaults (:mod:`.defaults`), the loop checkpoints every parameter with
``requires_grad``, and at the end calls the method's ``export`` hook; inference calls its ``load``
hook on a fresh model.

A **post-processor** runs after the final export (e.g. APP projector merging) and may write more
exports with ``ctx.write_export``.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .defaults import Default, check_defaults, infer_stage, resolve
from .layers import layer_index, num_decoder_layers  # noqa: F401  (re-exported for method authors)

#: The method packages shipped with anisogen, imported by :func:`load_plugins`.
PLUGIN_MODULES = ("anisogen.train.methods.app", "anisogen.train.methods.gap_init", "anisogen.train.methods.mores")


@dataclass
class MethodContext:
    """What a method's ``prepare`` gets.

    ``model``: the :class:`~anisogen.train.model.EmbeddingLM` (LM frozen, projector trainable, on
    ``device``). ``options``: this method's options, defaults merged with ``--opt key=value``.
    ``calibration(n)``: up to ``n`` training examples as collated batches (eval-mode transform, no
    noise), for data-dependent initialisation; a batch may carry ``has_image`` (B,) bool, False for
    text-only conversations. ``resuming``: True when a checkpoint will overwrite the trainable
    tensors right after ``prepare`` (expensive initialisation may be skipped, but the module
    structure must be identical). ``prefix_ids``: the token ids the run's template puts right before
    ``<image>`` (e.g. BOS, or a chat header), for methods that rebuild image-only sequences.
    ``stage``: ``stage1`` | ``stage2`` (None: inferred from ``config``). ``log(msg)`` prints on the
    main process.
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
    prefix_ids: tuple = ()
    stage: str | None = None


@dataclass
class ParamGroup:
    """A group of parameters returned by a method.

    ``role`` picks the default learning rate: ``projector`` -> ``projector_lr`` (``--lr``),
    ``adapter`` -> ``adapter_lr`` (``--adapter-lr``); both resolve per method and stage (:mod:`.defaults`).
    ``lr`` / ``weight_decay`` pin a value for this group (over flags and defaults); a pinned
    ``weight_decay`` applies to every tensor of the group, matrices included."""

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
    defaults: dict[str, Default] = field(default_factory=dict)  # see .defaults.DEFAULT_KEYS
    reads_lm_at_setup: bool = False  # prepare runs the LM (calibration): every rank needs real weights


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
    defaults: dict[str, Default] | None = None,
    reads_lm_at_setup: bool = False,
) -> Method:
    """Register a training method. Re-registering the same function is a no-op.

    ``defaults``: ``{key: Default(stage1, stage2, source)}`` for the keys of
    :data:`~.defaults.DEFAULT_KEYS`; missing keys use the LLaVA-1.5 base defaults.
    ``reads_lm_at_setup``: ``prepare`` runs the LM (e.g. a calibration pass), so the trainer loads real
    weights on every rank instead of building the LM on the meta device off the main process.
    """
    if name in METHODS and METHODS[name].prepare is not prepare:
        raise ValueError(f"method {name!r} is already registered")
    m = Method(name, prepare, export, load, dict(options or {}), trains_lm_weights, description,
               check_defaults(name, defaults), reads_lm_at_setup)
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
    #: (config, spec, trainable parameter names) -> None; raises ValueError when the run cannot be
    #: post-processed. Called before training (check_postprocessors) so a refusal costs no training.
    check: Callable[[Any, str, list], None] | None = None


POSTPROCESSORS: dict[str, PostProcessor] = {}


def register_postprocessor(name: str, run: Callable[[PostContext, str], dict], *, description: str = "",
                           check: Callable[[Any, str, list], None] | None = None) -> PostProcessor:
    """Register a step run after the final export as ``--post NAME[:SPEC]``.

    ``check(config, spec, trainable_names)``: optional early validation (see :func:`check_postprocessors`).
    """
    if name in POSTPROCESSORS and POSTPROCESSORS[name].run is not run:
        raise ValueError(f"post-processor {name!r} is already registered")
    POSTPROCESSORS[name] = PostProcessor(name, run, description, check)
    return POSTPROCESSORS[name]


def check_postprocessors(config, trainable_names) -> None:
    """Run the ``check`` of every ``--post NAME[:SPEC]`` in ``config.post`` against the parameters that
    will train (names as in ``named_parameters``). Call it after ``prepare`` and before the first step:
    a post-processor that would refuse the finished run then fails before any training."""
    names = list(trainable_names)
    for item in getattr(config, "post", None) or []:
        pname, _, spec = str(item).partition(":")
        pp = get_postprocessor(pname)
        if pp.check is not None:
            pp.check(config, spec, names)


#: module -> import error of plugins that failed to import (reported when their names are requested).
PLUGIN_ERRORS: dict[str, str] = {}


def load_plugins() -> None:
    """Import the method packages in :data:`PLUGIN_MODULES` (they register on import).

    A package that fails to import does not break the other methods: a warning is emitted and the
    error is repeated when one of its names is requested (``get_method``/``get_postprocessor``).
    """
    for mod in PLUGIN_MODULES:
        if mod in PLUGIN_ERRORS:
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
            raise ValueError(
                f"method {method.name!r} has no option {key!r}; options: {sorted(method.options) or 'none'}"
            )
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
    """Text listing methods, their options and defaults, and the post-processors (for ``--help``)."""
    from .defaults import format_defaults

    load_plugins()
    lines = ["methods:"]
    for m in METHODS.values():
        lines.append(f"  {m.name}: {m.description}")
        for k, (d, h) in m.options.items():
            lines.append(f"      --param {k}=VALUE  {h} (default {d!r})")
        lines += [f"      default {line}" for line in format_defaults(m).splitlines()]
    lines.append("post-processors (--post NAME[:SPEC]):")
    for p in POSTPROCESSORS.values():
        lines.append(f"  {p.name}: {p.description}")
    if not POSTPROCESSORS:
        lines.append("  (none registered)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Helpers for method authors


def context_method(ctx: MethodContext, method: "Method | str | None" = None) -> Method | None:
    """The Method a context runs: ``method`` (object or name), else ``ctx.config.method`` when registered."""
    if isinstance(method, Method):
        return method
    name = method if method is not None else getattr(ctx.config, "method", None)
    return METHODS.get(name) if isinstance(name, str) else None


def context_stage(ctx: MethodContext) -> str:
    return ctx.stage or infer_stage(ctx.config)


def projector_freeze(ctx: MethodContext, method: "Method | str | None" = None) -> tuple[bool, str]:
    """``(frozen, source)``: ``ctx.config.freeze_projector`` when True/False, else the method default."""
    frozen, source = resolve(context_method(ctx, method), "freeze_projector", ctx.config, context_stage(ctx))
    return bool(frozen), source


def projector_groups(ctx: MethodContext, method: "Method | str | None" = None) -> list[ParamGroup]:
    """The projector's group, or [] with its parameters frozen.

    Frozen when ``ctx.config.freeze_projector`` is True; trainable when it is False; when it is None
    (or missing) the method's ``freeze_projector`` default decides (``method``: the Method or its name;
    default ``ctx.config.method``).
    """
    params = list(ctx.model.projector.parameters())
    frozen, _ = projector_freeze(ctx, method)
    for p in params:
        p.requires_grad_(not frozen)
    return [] if frozen else [ParamGroup("projector", params, role="projector")]
