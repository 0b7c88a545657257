"""APP file I/O: projector safetensors files, ``merge_files`` (the offline merge) and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .config import AppConfig
from .merge import app_merge

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



def coadapted_parts(export_dir: str | Path) -> list[str]:
    """What an export holds besides its projector that was trained in the same run: a PEFT adapter,
    method modules (``extras.safetensors``, e.g. MoReS steering) or LM weights (method ``full``).

    Such parts co-adapted to that run's projector; putting a different (merged) projector next to them
    yields a combination that was never trained. Returns human-readable entries ([] = projector only).
    """
    d = Path(export_dir)
    cfg_file = d / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    parts = []
    if (d / "adapter").is_dir():
        parts.append("adapter/ (PEFT adapter)")
    if (d / "extras.safetensors").is_file():
        parts.append("extras.safetensors (method modules, e.g. MoReS steering)")
    if (cfg.get("method_info") or {}).get("lm") == "full":
        parts.append("lm/ (LM weights trained by method 'full')")
    return parts
