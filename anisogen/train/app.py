"""APP: Anchor-Preserving Projection (spectral filtering of the projector task vector).

Paper: "The Dominance of Text Space: Unveiling the Asymmetric Nature of Cross-Modal Alignment in Large
Language Models" (Chen et al., PatSnap), §4.1-4.3 and Alg. 1; each choice where it is ambiguous is a named
option, listed in ``docs/METHODS.md``.

For every 2-D weight matrix of the projector (``mlp2x_gelu``: ``0.weight`` and ``2.weight``)::

    tau      = W_ft - W_pre                          (eq. 5 left side; float64 on CPU)
    tau      = U diag(s) V^T                         (eq. 5, s descending)
    tau_k    = U[:, :k] diag(s[:k]) V^T[:k, :]       (eq. 6; Alg. 1 lines 5-8 with the slicing typos fixed)
    W_merged = W_pre + alpha * tau_k                 (eq. 7)

``k`` comes from one of two rules (``mode``):

``ratio``   ``k = floor(rank(tau) * k_ratio)`` (Alg. 1 line 3, ``k_ratio`` default 0.25, Table 2).
``energy``  the smallest ``k`` with ``sum_{i<=k} s_i^2 / sum_i s_i^2 >= energy`` (§5.4, default 0.8;
            energy measured with s^2 as in appendix A).

both clamped to ``[min_k, rank]`` (``min_k`` default 1). ``rank(tau)`` is the numerical rank with the
``torch.linalg.matrix_rank`` tolerance ``s_max * max(m, n) * eps(float64)``.

Other merge modes on the same state dicts: ``naive`` (the plain task vector, the paper's TV baseline:
``W_pre + alpha * tau``) and ``ties`` (single-task TIES-Merging: keep the ``density`` fraction of
largest-magnitude entries of ``tau``; with one task the sign election is a no-op).

Non-matrix tensors (biases) cannot be SVD-filtered; ``bias_policy`` decides:

``full``  (default) ``b_pre + alpha * delta_b``: the full bias delta (as TSV-C keeps non-matrix params).
``drop``  ``b_pre``: the bias delta is discarded.
``scale`` ``b_pre + alpha * rho * delta_b`` where ``rho = ||tau_k||_F / ||tau||_F`` of the sibling
          ``.weight`` matrix (the fraction of the update norm the weight kept); ``bias_scale`` overrides
          ``rho`` with a constant.

Per-layer selection: ``include`` (a regex or a list of tensor names) chooses which matrices are
filtered; unselected matrices receive the full delta (``W_pre + alpha * tau``, what the paper's
layer-sensitivity ablation B.1 compares against).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

MODES = ("energy", "ratio", "naive", "ties")
BIAS_POLICIES = ("full", "drop", "scale")

APP_SPEC_HELP = (
    "energy:F (keep the smallest k explaining fraction F of sum(sigma^2), default energy:0.8) | "
    "ratio:R (k = floor(rank * R), e.g. ratio:0.25) | naive (plain task vector) | ties:D (keep the "
    "fraction D of largest-magnitude task-vector entries)"
)


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


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Numerical rank from descending singular values ``s`` (float64) of an ``shape`` matrix.

    Same tolerance as ``torch.linalg.matrix_rank``: ``s_max * max(m, n) * eps``.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float64).eps
    return int((s > tol).sum())


def choose_k(s: torch.Tensor, rank: int, *, mode: str, k_ratio: float = 0.25, energy: float = 0.8, min_k: int = 1) -> int:
    """Number of kept components for singular values ``s`` (descending, float64).

    ``ratio``: ``floor(rank * k_ratio)``; ``energy``: smallest k whose cumulative ``s^2`` fraction
    reaches ``energy`` (a relative slack of 1e-12 absorbs rounding). Clamped to ``[min_k, rank]``;
    0 when ``rank == 0`` (nothing to keep).
    """
    if rank == 0:
        return 0
    if mode == "ratio":
        k = math.floor(rank * k_ratio)
    elif mode == "energy":
        e = s.double() ** 2
        frac = torch.cumsum(e, 0) / e.sum()
        k = int(torch.searchsorted(frac, torch.tensor(energy - 1e-12, dtype=frac.dtype)).item()) + 1
    else:
        raise ValueError(f"choose_k: mode must be 'ratio' or 'energy', got {mode!r}")
    return int(min(max(k, min_k), rank))


def svd_truncate(
    delta: torch.Tensor,
    *,
    mode: str = "energy",
    k_ratio: float = 0.25,
    energy: float = 0.8,
    min_k: int = 1,
    k: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Best rank-k approximation (Eckart-Young) of a 2-D task vector.

    Args:
        delta: (m, n) tensor, any float dtype/device; the SVD runs in float64 on CPU.
        mode, k_ratio, energy, min_k: the k rule (:func:`choose_k`).
        k: explicit number of components (overrides the rule; clamped to the rank).
    Returns:
        ``(delta_k, info)``: ``delta_k`` (m, n) float64 CPU; ``info`` = {``k``, ``rank``,
        ``retained_energy`` (sum of kept s^2 / total, 1.0 for a zero delta), ``norm_fraction``
        (||delta_k||_F / ||delta||_F), ``frobenius`` (||delta||_F), ``spectrum`` (list of all s)}.
    """
    if delta.dim() != 2:
        raise ValueError(f"svd_truncate needs a 2-D matrix, got shape {tuple(delta.shape)}")
    d = delta.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError("task vector contains NaN/inf values; the fine-tuned checkpoint is broken")
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    rank = numerical_rank(s, tuple(d.shape))
    if k is None:
        k = choose_k(s, rank, mode=mode, k_ratio=k_ratio, energy=energy, min_k=min_k)
    else:
        k = int(min(max(int(k), 0), rank))
    delta_k = (u[:, :k] * s[:k]) @ vh[:k, :]
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    info = {
        "k": int(k),
        "rank": int(rank),
        "retained_energy": kept / total if total > 0 else 1.0,
        "norm_fraction": math.sqrt(kept / total) if total > 0 else 1.0,
        "frobenius": math.sqrt(total),
        "spectrum": [float(x) for x in s],
    }
    return delta_k, info


def ties_trim(delta: torch.Tensor, density: float) -> tuple[torch.Tensor, dict]:
    """Single-task TIES: keep the ``ceil(density * numel)`` largest-|x| entries (ties broken by index).

    Returns ``(trimmed float64 CPU, info{kept, numel, retained_energy})``.
    """
    d = delta.detach().to(device="cpu", dtype=torch.float64)
    flat = d.flatten()
    n_keep = max(1, math.ceil(density * flat.numel())) if flat.numel() else 0
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:n_keep]] = True
    out = torch.where(keep, flat, torch.zeros_like(flat)).reshape(d.shape)
    total = float((flat**2).sum())
    return out, {
        "kept": int(n_keep),
        "numel": int(flat.numel()),
        "retained_energy": float((out**2).sum()) / total if total > 0 else 1.0,
    }


def _selected(name: str, include) -> bool:
    if include is None:
        return True
    if isinstance(include, str):
        return re.search(include, name) is not None
    return name in set(include)


def _check_pair(pre: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(pre) ^ set(ft))
    if missing:
        where = "fine-tuned" if missing[0] in pre else "pre-trained"
        raise KeyError(
            f"projector state dicts differ: tensor {missing[0]!r} is missing from the {where} checkpoint "
            f"({len(missing)} mismatched names); both must come from the same projector kind"
        )
    for name in pre:
        if tuple(pre[name].shape) != tuple(ft[name].shape):
            raise ValueError(
                f"tensor {name!r}: pre-trained shape {tuple(pre[name].shape)} != fine-tuned shape "
                f"{tuple(ft[name].shape)}"
            )


def app_merge(
    pre_sd: Mapping[str, torch.Tensor],
    ft_sd: Mapping[str, torch.Tensor],
    config: AppConfig | None = None,
    **kwargs,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge a fine-tuned projector into its pre-trained anchor (APP / naive TV / TIES).

    Args:
        pre_sd: theta_pre, name -> tensor (the stage-1 projector).
        ft_sd: theta_ft with the same names and shapes (the stage-2 projector-only fine-tune).
        config: an :class:`AppConfig`; or pass its fields as ``kwargs``.
    Returns:
        ``(merged, report)``: ``merged`` has the names, shapes and dtypes of ``ft_sd`` (arithmetic in
        float64 on CPU, then cast); ``report`` is JSON-able: ``{"method", "config", "tensors": {name:
        {...}}, "totals"}`` where each matrix entry carries ``k``, ``rank``, ``retained_energy``,
        ``spectrum`` and each non-matrix entry its ``bias_policy`` and ``scale``.
    """
    if config is None:
        config = AppConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either an AppConfig or keyword options, not both")
    _check_pair(pre_sd, ft_sd)
    merged: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict] = {}
    # matrices first, so that biases can use the sibling weight's norm fraction
    names = sorted(pre_sd, key=lambda n: (pre_sd[n].dim() != 2, n))
    for name in names:
        pre = pre_sd[name].detach().to("cpu", torch.float64)
        ft = ft_sd[name].detach().to("cpu", torch.float64)
        out_dtype = ft_sd[name].dtype
        if not torch.is_floating_point(ft_sd[name]):
            merged[name] = ft_sd[name].detach().clone()
            tensors[name] = {"kind": "copied", "reason": "not floating point"}
            continue
        tau = ft - pre
        entry: dict = {"shape": list(pre.shape), "frobenius": float(tau.norm())}
        if pre.dim() == 2:
            filtered = _selected(name, config.include)
            if config.mode in ("energy", "ratio") and filtered:
                tau_f, info = svd_truncate(
                    tau, mode=config.mode, k_ratio=config.k_ratio, energy=config.energy, min_k=config.min_k
                )
                entry.update(kind="matrix", filtered=True, **info)
            elif config.mode == "ties" and filtered:
                tau_f, info = ties_trim(tau, config.density)
                entry.update(kind="matrix", filtered=True, **info)
                entry["norm_fraction"] = math.sqrt(info["retained_energy"])
            else:
                tau_f = tau
                entry.update(kind="matrix", filtered=False, retained_energy=1.0, norm_fraction=1.0)
                if config.mode in ("energy", "ratio"):
                    # still report the spectrum of unfiltered matrices (useful for the analysis)
                    _, info = svd_truncate(tau, k=None, mode="ratio", k_ratio=1.0)
                    entry.update(k=info["rank"], rank=info["rank"], spectrum=info["spectrum"])
            merged[name] = (pre + config.alpha * tau_f).to(out_dtype)
        else:
            policy = config.bias_policy
            if policy == "full":
                scale = 1.0
            elif policy == "drop":
                scale = 0.0
            else:
                if config.bias_scale is not None:
                    scale = float(config.bias_scale)
                else:
                    sibling = _sibling_weight(name)
                    if sibling is None or sibling not in tensors:
                        raise KeyError(
                            f"bias_policy='scale' needs the weight matrix paired with {name!r} "
                            f"(expected {sibling!r}); pass bias_scale= for unpaired tensors"
                        )
                    scale = float(tensors[sibling].get("norm_fraction", 1.0))
            entry.update(kind="vector", bias_policy=policy, scale=scale)
            merged[name] = (pre + config.alpha * scale * tau).to(out_dtype)
        tensors[name] = entry
    report = {
        "method": "app" if config.mode in ("energy", "ratio") else config.mode,
        "config": config.to_dict(),
        "tensors": {n: tensors[n] for n in sorted(tensors)},
        "totals": _totals(tensors),
    }
    return {n: merged[n] for n in ft_sd}, report


def _sibling_weight(name: str) -> str | None:
    if name.endswith("bias"):
        return name[: -len("bias")] + "weight"
    return None


def _totals(tensors: dict[str, dict]) -> dict:
    mats = [t for t in tensors.values() if t.get("kind") == "matrix"]
    tot = sum(t["frobenius"] ** 2 for t in mats)
    kept = sum(t["frobenius"] ** 2 * t.get("retained_energy", 1.0) for t in mats)
    return {
        "matrices": len(mats),
        "filtered": sum(1 for t in mats if t.get("filtered")),
        "retained_energy": kept / tot if tot > 0 else 1.0,
    }


def task_vector(pre_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ft - pre`` per tensor in float64 on CPU (the paper's tau)."""
    _check_pair(pre_sd, ft_sd)
    return {n: ft_sd[n].detach().to("cpu", torch.float64) - pre_sd[n].detach().to("cpu", torch.float64) for n in pre_sd}


# ---------------------------------------------------------------------------------------------- file I/O


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    if not prefix:
        return sd
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no tensor name starts with {prefix!r}")
    return out


def resolve_projector_file(path: str | Path, filename: str = "projector.safetensors") -> Path:
    """``path`` itself when it is a file, else ``path/filename`` (an export or checkpoint folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise FileNotFoundError(f"projector weights {p} do not exist")
    return p


def load_state(path: str | Path, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file -> (tensors with ``prefix`` stripped, metadata dict)."""
    from safetensors import safe_open

    p = resolve_projector_file(path)
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return _strip_prefix(sd, prefix), meta


def merge_files(
    pre: str | Path,
    ft: str | Path,
    out: str | Path,
    config: AppConfig,
    *,
    prefix: str | None = None,
    report_path: str | Path | None = None,
) -> dict:
    """Merge two projector safetensors files; write the merged file (+ JSON report); return the report.

    ``out`` is a file path, or a folder that receives ``projector.safetensors`` and ``app_report.json``.
    The safetensors metadata of ``ft`` is kept and ``app`` (the JSON config) is added. The file is
    written to a temporary name and renamed, so a partial output never looks complete.
    """
    from safetensors.torch import save_file

    pre_sd, _ = load_state(pre, prefix)
    ft_sd, meta = load_state(ft, prefix)
    merged, report = app_merge(pre_sd, ft_sd, config)
    report["inputs"] = {"pre": str(resolve_projector_file(pre)), "ft": str(resolve_projector_file(ft))}
    out = Path(out)
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
        report_path = report_path or out / "app_report.json"
        out = out / "projector.safetensors"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        report_path = report_path or out.with_suffix(".app_report.json")
    if prefix:
        merged = {prefix + k: v for k, v in merged.items()}
    meta = {**meta, "app": json.dumps(config.to_dict(), sort_keys=True)}
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    report["output"] = str(out)
    Path(report_path).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def summarize(report: dict) -> Iterable[str]:
    """Human-readable lines (one per tensor) for a merge report."""
    for name, t in report["tensors"].items():
        if t.get("kind") == "matrix":
            if t.get("filtered") and "k" in t:
                yield f"{name}: k={t['k']}/{t['rank']} retained_energy={t['retained_energy']:.4f}"
            elif t.get("filtered"):
                yield f"{name}: kept {t['kept']}/{t['numel']} entries, retained_energy={t['retained_energy']:.4f}"
            else:
                yield f"{name}: full delta (not selected)"
        elif t.get("kind") == "vector":
            yield f"{name}: bias policy {t['bias_policy']} (scale {t['scale']:.4f})"


# ---------------------------------------------------------------------------------------------- trainer glue


def export_slug(spec: str) -> str:
    """Folder-name-safe form of an APP spec: ``energy:0.8`` -> ``energy-0.8``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec.strip()).strip("-") or "energy-0.8"


def _run_app_post(ctx, spec: str) -> dict:
    """``--post app:SPEC``: merge the trained projector into its initial state and export it.

    theta_pre = the projector right after the method's ``prepare`` (the ``--init-from`` stage-1
    projector), theta_ft = the trained projector. Writes ``<output_dir>/export_app-<slug>/`` (a full
    export with the merged projector and ``app_report.json``) and ``<output_dir>/projector_pre.safetensors``
    (theta_pre, for re-merging with ``pipelines/merge.py``). The raw export stays in ``export/``.
    """
    from safetensors.torch import save_file

    spec = spec or "energy:0.8"
    cfg = parse_app_spec(spec)
    pre = {k[len("projector."):]: v for k, v in ctx.initial_trainable.items() if k.startswith("projector.")}
    if not pre:
        raise ValueError("APP needs a trained projector, but the projector was not trainable in this run "
                         "(use --method projector without --freeze-projector)")
    ft = {k: v.detach().cpu().float() for k, v in ctx.model.projector.state_dict().items()}
    if getattr(ctx.config, "init_from", None) is None:
        ctx.log("app: no --init-from stage-1 projector; theta_pre is the projector's random initialisation")
    merged, report = app_merge(pre, ft, cfg)
    pre_file = Path(ctx.output_dir) / "projector_pre.safetensors"
    save_file({k: v.contiguous() for k, v in pre.items()}, str(pre_file))
    out = ctx.write_export(Path(ctx.output_dir) / f"export_app-{export_slug(spec)}", projector_state=merged)
    report["inputs"] = {"pre": str(pre_file), "ft": str(Path(ctx.export_dir) / "projector.safetensors")}
    report["output"] = str(out)
    (Path(out) / "app_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    for line in summarize(report):
        ctx.log(f"app[{spec}]: {line}")
    brief = {n: {k: v for k, v in t.items() if k != "spectrum"} for n, t in report["tensors"].items()}
    return {"export": str(out), "config": report["config"], "totals": report["totals"], "tensors": brief}


def _register() -> None:
    from .methods import register_postprocessor

    register_postprocessor("app", _run_app_post,
                           description=f"APP projector merge against the initial projector; SPEC: {APP_SPEC_HELP}")


_register()
