"""Experiment trackers through accelerate (``--report-to``), next to the always-written metrics.jsonl.

``auto`` picks TensorBoard (a dependency of anisogen) and adds wandb / mlflow when the package is
installed *and* configured (``WANDB_API_KEY`` or ``WANDB_MODE``; ``MLFLOW_TRACKING_URI``), so an
installed but unconfigured tracker never blocks a run on a login prompt. An explicit list is used as
given; a tracker accelerate cannot find is an error naming it.
"""

from __future__ import annotations

import importlib.util
import json
import os

_AUTO_EXTRAS = {"wandb": ("WANDB_API_KEY", "WANDB_MODE"), "mlflow": ("MLFLOW_TRACKING_URI",)}


def resolve_report_to(spec: str) -> list[str]:
    """Tracker names for ``--report-to`` (see the module docstring)."""
    spec = (spec or "none").strip().lower()
    if spec == "none":
        return []
    if spec == "auto":
        names = ["tensorboard"] if _installed("tensorboard") or _installed("tensorboardX") else []
        for name, env in _AUTO_EXTRAS.items():
            if _installed(name) and any(os.environ.get(e) for e in env):
                names.append(name)
        return names
    names = [s.strip() for s in spec.split(",") if s.strip()]
    from accelerate.utils import LoggerType

    known = {t.value for t in LoggerType}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--report-to: unknown tracker(s) {bad}; accelerate knows {sorted(known)}")
    return names


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tracker_config(cfg_dict: dict) -> dict:
    """The config flattened to scalars (what TensorBoard's hparams and mlflow accept)."""
    out = {}
    for k, v in cfg_dict.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
    return out
