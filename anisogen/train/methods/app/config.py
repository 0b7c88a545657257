"""APP options: :class:`AppConfig`, the ``RULE`` spec parser and the ``--post app`` spec flags.

``--post app:SPEC`` takes ``RULE[,FLAG...]``: ``RULE`` is one of ``APP_SPEC_HELP`` (default
``energy:0.8``), the flags lift the post-processor's refusals (:data:`POST_FLAGS`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ...config import APP_SPEC_HELP, BIAS_POLICIES  # defined there, free of torch (for --help)

MODES = ("energy", "ratio", "naive", "ties")


@dataclass
class AppConfig:
    """All APP merge options (defaults = the spec's recommended defaults).

    Attributes:
        mode: ``energy`` | ``ratio`` | ``naive`` | ``ties``.
        energy: retained-energy threshold in (0, 1] for ``mode="energy"``.
        k_ratio: rank ratio in (0, 1] for ``mode="ratio"``.
        alpha: task-vector scale (eq. 7), 1.0 in the paper.
        bias_policy: ``full`` | ``drop`` | ``scale`` (module docstring).
        bias_scale: constant used by ``bias_policy="scale"`` instead of the per-layer norm fraction.
        include: regex (``re.search``) or list of exact tensor names selecting the matrices to filter;
            ``None`` filters every 2-D floating tensor.
        min_k: lower bound on k for non-zero task vectors (>= 1).
        density: kept fraction for ``mode="ties"``.
    """

    mode: str = "energy"
    energy: float = 0.8
    k_ratio: float = 0.25
    alpha: float = 1.0
    bias_policy: str = "full"
    bias_scale: float | None = None
    include: str | list[str] | None = None
    min_k: int = 1
    density: float = 0.2

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"APP mode {self.mode!r} is not one of {MODES}")
        if self.bias_policy not in BIAS_POLICIES:
            raise ValueError(f"APP bias policy {self.bias_policy!r} is not one of {BIAS_POLICIES}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"APP energy threshold must be in (0, 1], got {self.energy}")
        if not 0.0 < self.k_ratio <= 1.0:
            raise ValueError(f"APP k_ratio must be in (0, 1], got {self.k_ratio}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"TIES density must be in (0, 1], got {self.density}")
        if self.min_k < 1:
            raise ValueError(f"APP min_k must be >= 1, got {self.min_k}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_app_spec(spec: str, **overrides) -> AppConfig:
    """Parse ``energy:0.8`` | ``ratio:0.25`` | ``naive`` | ``ties:0.2`` (see ``APP_SPEC_HELP``).

    ``energy`` / ``ratio`` / ``ties`` without a value use the defaults; ``overrides`` are further
    :class:`AppConfig` fields (alpha, bias_policy, include, ...).
    """
    spec = spec.strip()
    name, _, value = spec.partition(":")
    name = name.strip().lower()
    kw: dict = {"mode": name}
    if name not in MODES:
        raise ValueError(f"bad APP spec {spec!r}: expected {APP_SPEC_HELP}")
    if value:
        if name == "naive":
            raise ValueError(f"bad APP spec {spec!r}: 'naive' takes no value")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad APP spec {spec!r}: {value!r} is not a number") from None
        kw[{"energy": "energy", "ratio": "k_ratio", "ties": "density"}[name]] = number
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return AppConfig(**kw)


#: Flags of ``--post app:RULE[,FLAG...]`` -> what each one allows (see ``post.py``).
POST_FLAGS = {
    "allow_random_anchor": "merge although the run had no --init-from (theta_pre = the random initialisation)",
    "allow_coadapted": "write the merged export although adapters / LM weights / extras trained with the "
                       "unfiltered projector in the same run",
    "force": "both of the above",
}

DEFAULT_RULE = "energy:0.8"


def split_post_spec(spec: str | None) -> tuple[str, set[str]]:
    """``"ratio:0.25,allow_random_anchor"`` -> ``("ratio:0.25", {"allow_random_anchor"})``.

    The rule defaults to ``energy:0.8``; ``force`` expands to every flag. Unknown flags raise.
    """
    rule, flags = "", set()
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        if part.lower() in POST_FLAGS:
            flags.add(part.lower())
        elif rule:
            raise ValueError(f"bad APP spec {spec!r}: {part!r} is neither a flag ({', '.join(POST_FLAGS)}) "
                             f"nor the only rule")
        else:
            rule = part
    if "force" in flags:
        flags = set(POST_FLAGS) - {"force"}
    return rule or DEFAULT_RULE, flags


def export_slug(spec: str) -> str:
    """Folder-name-safe form of an APP spec's rule (flags ignored): ``energy:0.8`` -> ``energy-0.8``."""
    rule, _ = split_post_spec(spec)
    return re.sub(r"[^A-Za-z0-9.]+", "-", rule.strip()).strip("-") or "energy-0.8"
