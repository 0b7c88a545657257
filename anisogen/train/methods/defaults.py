"""Per-method, per-stage optimisation defaults, each with the paper or config it comes from.

A method declares its defaults when it registers (``register_method(..., defaults={...})``); keys it
leaves out fall back to :data:`BASE_DEFAULTS` (the LLaVA-1.5 recipe). The trainer resolves every value
for the run's stage with :func:`resolve`: an explicit ``TrainConfig`` value wins, ``None`` means "the
method's default for this stage". :func:`~.optim.optimizer_groups` returns the resolved values with
their sources next to the optimizer groups, so a run can say where each learning rate came from.

Keys (:data:`DEFAULT_KEYS`) and the ``TrainConfig`` field that overrides each:

``projector_lr``      ``lr``               groups with ``role="projector"``
``adapter_lr``        ``adapter_lr``       groups with ``role="adapter"`` (LoRA, LM weights, steering...)
``weight_decay``      ``weight_decay``     matrices only; biases, norms and 1-D tensors never decay
``freeze_projector``  ``freeze_projector`` whether :func:`~.registry.projector_groups` freezes it

Stages: ``stage1`` (shards + plain captions: projector pretraining) and ``stage2`` (JSONL
conversations: instruction tuning); :func:`infer_stage` tells them apart from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGES = ("stage1", "stage2")

#: default key -> the TrainConfig field whose explicit (non-None) value overrides it.
DEFAULT_KEYS = {
    "projector_lr": "lr",
    "adapter_lr": "adapter_lr",
    "weight_decay": "weight_decay",
    "freeze_projector": "freeze_projector",
}

LLAVA = "LLaVA-1.5, 'Improved Baselines with Visual Instruction Tuning' (arXiv 2310.03744)"


@dataclass(frozen=True)
class Default:
    """One default: its value in each stage and where it comes from (paper, table, released config)."""

    stage1: Any
    stage2: Any
    source: str

    @classmethod
    def same(cls, value, source: str) -> "Default":
        """The same value in both stages."""
        return cls(value, value, source)

    def at(self, stage: str):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.stage1 if stage == "stage1" else self.stage2

    def describe(self) -> dict:
        return {"stage1": self.stage1, "stage2": self.stage2, "source": self.source}


#: Defaults of a method that declares none (the LLaVA-1.5 recipe).
BASE_DEFAULTS: dict[str, Default] = {
    "projector_lr": Default(1e-3, 2e-5, f"{LLAVA}: projector lr 1e-3 in stage-1 pretraining, 2e-5 in stage-2 "
                                        "fine-tuning"),
    "adapter_lr": Default.same(2e-4, f"{LLAVA}, LoRA fine-tuning recipe: lr 2e-4 for the adapters"),
    "weight_decay": Default.same(0.0, f"{LLAVA}: weight decay 0 in both stages"),
    "freeze_projector": Default.same(False, f"{LLAVA}: the projector trains in both stages"),
}


def check_defaults(method_name: str, defaults: dict | None) -> dict[str, Default]:
    """Validate a method's ``defaults`` mapping (keys of :data:`DEFAULT_KEYS`, values :class:`Default`)."""
    out = {}
    for key, d in (defaults or {}).items():
        if key not in DEFAULT_KEYS:
            raise ValueError(f"method {method_name!r}: unknown default {key!r}; known: {sorted(DEFAULT_KEYS)}")
        if not isinstance(d, Default):
            raise TypeError(f"method {method_name!r}: default {key!r} must be a Default(stage1, stage2, source)")
        out[key] = d
    return out


def infer_stage(config) -> str:
    """``stage2`` when the run trains on JSONL conversations (``train_jsonl``), else ``stage1``."""
    return "stage2" if getattr(config, "train_jsonl", None) else "stage1"


def method_default(method, key: str, stage: str) -> tuple[Any, str]:
    """``(value, source)`` of ``key`` for ``method`` (a Method or None) at ``stage``."""
    if key not in DEFAULT_KEYS:
        raise KeyError(f"unknown default {key!r}; known: {sorted(DEFAULT_KEYS)}")
    own = getattr(method, "defaults", None) or {}
    d = own.get(key) or BASE_DEFAULTS[key]
    who = getattr(method, "name", None)
    prefix = f"method {who!r} default" if key in own else "base default"
    return d.at(stage), f"{prefix} ({stage}): {d.source}"


def resolve(method, key: str, config, stage: str) -> tuple[Any, str]:
    """``(value, source)``: the explicit config field (not None) or the method's default at ``stage``."""
    field = DEFAULT_KEYS[key]
    explicit = getattr(config, field, None) if config is not None else None
    if explicit is not None:
        return explicit, f"explicit TrainConfig.{field} (--{field.replace('_', '-')})"
    return method_default(method, key, stage)


def format_defaults(method) -> str:
    """One line per key with both stages (for ``--help``)."""
    lines = []
    for key in DEFAULT_KEYS:
        v1, _ = method_default(method, key, "stage1")
        v2, src = method_default(method, key, "stage2")
        val = f"{v1}" if v1 == v2 else f"{v1} (stage 1) / {v2} (stage 2)"
        lines.append(f"{key} = {val}  [{src.split(': ', 1)[1]}]")
    return "\n".join(lines)
