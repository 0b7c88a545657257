"""Run a whole audit: load inputs, compute metrics per shard folder, write report.json / report.html / plots.

:func:`run_audit` is what ``pipelines/audit.py`` calls. Output folder layout::

    report.json     every metric, inputs, sample sizes, fingerprints, kNN index facts, timings, gates
    report.html     one self-contained page (figures inlined as base64 PNG)
    plots/*.png     the same figures as files
    rejects.jsonl   shards / samples skipped under --skip-corrupt (only when any were)

``report.json`` is written last (temp file + rename) and removed at the start of a run, so a folder
with a ``report.json`` always holds a finished audit.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..align import load_aligner
from ..shards.writer import atomic_write_bytes, atomic_write_json
from . import plots
from .gates import evaluate_gates, parse_gate
from .html import render_html
from .index import RECALL_SAMPLE, RECALL_TARGET, knn_graph
from .loading import (
    AuditInputError, EmbeddingSet, check_consistency, load_images, load_paired, load_shard_folder,
)
from .metrics import (
    N_PAIRS, N_PERMUTATIONS, covariance_spectrum, mixing_query_rows, moments, norm_stats, paired_metrics,
    pairwise_cosines, semantic_metrics, semantic_query_rows, split_scalars, unit_rows, unpaired_metrics,
)

from .defaults import (  # noqa: F401
    LIMIT, MAX_QUERIES, METRIC_NAMES, PAIRED_METRICS, PARALLEL_MIN_ROWS, SEMANTIC_METRICS, UNPAIRED_METRICS, VERIFY,
    VERIFY_MODES,
)
from .scan import Timer
from .workers import TaskPool
#: Rows per set drawn into the PCA figure.
PCA_ROWS = 1500


@dataclass
class AuditConfig:
    """Everything an audit needs; see ``pipelines/audit.py --help`` for each field."""

    shards: list[str]
    images: str
    out: str
    paired: str | None = None
    labels: list[str] | None = None
    max_samples: int | None = LIMIT
    paired_max_samples: int | None = 10_000
    max_queries: int | None = MAX_QUERIES
    seed: int = 0
    k: int = 20
    q: int | None = None
    index: str = "auto"
    device: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    recall_target: float = RECALL_TARGET
    recall_sample: int = RECALL_SAMPLE
    n_pairs: int = N_PAIRS
    n_permutations: int = N_PERMUTATIONS
    skip_corrupt: bool = False
    source_baseline: bool = False
    fail_if: list[str] = field(default_factory=list)
    progress: bool = False
    verify: str = VERIFY
    workers: int = 1


def versions() -> dict:
    """Versions of the libraries behind the numbers."""
    import faiss
    import matplotlib
    import torch

    return {"anisogen": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "faiss": getattr(faiss, "__version__", "?"), "torch": torch.__version__,
            "matplotlib": matplotlib.__version__}


def json_safe(obj: Any) -> Any:
    """Strict-JSON copy: arrays -> lists, NaN/Inf -> None, NumPy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _unique_labels(paths: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(paths):
            raise AuditInputError(f"--labels gives {len(labels)} names for {len(paths)} --shards folders")
        if len(set(labels)) != len(labels):
            raise AuditInputError(f"--labels must be unique, got {labels}")
        return list(labels)
    names = [Path(p).resolve().name for p in paths]
    out = []
    for p, name in zip(paths, names):
        out.append(name if names.count(name) == 1 else f"{Path(p).resolve().parent.name}/{name}")
    if len(set(out)) != len(out):
        out = [f"{name}#{i}" for i, name in enumerate(out)]
    return out


def _knn(cfg: AuditConfig, base: np.ndarray, timer: Timer, query_rows: np.ndarray):
    with timer.stage("knn"):
        rows = None if len(query_rows) == len(base) else query_rows
        return knn_graph(base, k=cfg.k, kind=cfg.index, device=cfg.device, nlist=cfg.nlist, nprobe=cfg.nprobe,
                         recall_target=cfg.recall_target, recall_sample=cfg.recall_sample, seed=cfg.seed,
                         query_rows=rows)


def _unit(s: EmbeddingSet, field: str = "emb") -> np.ndarray:
    """float64 unit rows of ``s.emb`` / ``s.src``; a zero row raises naming its sample key."""
    arr = getattr(s, field)
    zero = np.flatnonzero(np.linalg.norm(arr, axis=1) <= 1e-12)
    if zero.size:
        raise AuditInputError(f"{s.path}: {field} of sample {s.keys[zero[0]]} is all zeros and has no direction "
                              f"({zero.size} such rows)")
    return unit_rows(arr, f"{s.path} {field}")


def _log(cfg: AuditConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr, flush=True)


def run_audit(cfg: AuditConfig) -> dict:
    """Audit ``cfg.shards`` against ``cfg.images`` (and ``cfg.paired``); write the report; return it.

    Raises :class:`~anisogen.audit.loading.AuditInputError` for bad input and
    :class:`~anisogen.audit.gates.GateError` for unusable ``fail_if`` rules (both before any heavy work
    where possible). Gate *failures* do not raise: they are in ``report["gates"]``.
    """
    timer = Timer()
    total_start = time.perf_counter()
    gates = [parse_gate(rule, METRIC_NAMES) for rule in cfg.fail_if]
    if not cfg.shards:
        raise AuditInputError("give at least one --shards folder")
    if cfg.k < 1:
        raise AuditInputError(f"--k must be >= 1, got {cfg.k}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "report.html", "rejects.jsonl"):
        (out / stale).unlink(missing_ok=True)
    labels = _unique_labels(cfg.shards, cfg.labels)

    # ------------------------------------------------------------------ inputs
    images, folders, paired = _read_inputs(cfg, labels, timer)
    sets: list[EmbeddingSet] = [images, *folders] + (list(paired) if paired else [])
    d, fingerprint, warnings = check_consistency(sets)
    for s in sets:
        if s.n < cfg.k + 1:
            raise AuditInputError(f"{s.label} ({s.path}): {s.n} rows, but k={cfg.k} needs at least {cfg.k + 1}")
    aligners = {}
    if paired:
        for f in folders:
            try:
                aligners[f.label] = load_aligner(f.aligner_dir, model_fingerprint=f.model_fingerprint, dim=d)
            except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
                raise AuditInputError(f"{f.path}: cannot use its aligner artifact for --paired: {exc}") from None
    _log(cfg, f"audit: images {images.n}/{images.n_total}, "
              + ", ".join(f"{f.label} {f.n}/{f.n_total}" for f in folders) + f", d={d}")

    # ------------------------------------------------------------- image side
    with timer.stage("moments"):
        x = _unit(images)
        mx = images.moments  # every row, from the scan
        cos_x = pairwise_cosines(x, n_pairs=cfg.n_pairs, seed=cfg.seed)
    curves: dict[str, dict[str, np.ndarray]] = {"covariance_spectrum": {"images": covariance_spectrum(mx.covariance)},
                                                "residual_spectrum": {}}
    cosines = {"images": cos_x}
    pca_groups = {"images": x}

    # ------------------------------------------------------------ per folder
    rows: list[dict] = []
    units: dict[str, np.ndarray] = {}

    def audit_one(label: str, z: np.ndarray, norms: dict, src: np.ndarray | None,
                  mz=None) -> tuple[dict, dict]:
        _log(cfg, f"audit: {label}: kNN over {x.shape[0] + z.shape[0]} pooled rows")
        mix_rows = mixing_query_rows(x.shape[0], z.shape[0], cfg.max_queries, cfg.seed)
        pooled = _knn(cfg, np.concatenate([x, z], dtype=np.float32), timer, mix_rows)
        with timer.stage("metrics"):
            met = unpaired_metrics(x, z, k=cfg.k, seed=cfg.seed, q=cfg.q, neighbours=pooled.neighbours,
                                   query_rows=mix_rows, n_pairs=cfg.n_pairs, n_permutations=cfg.n_permutations,
                                   image_moments=mx, image_cosines=cos_x, substitute_moments=mz)
            met.update(norms)
        knn_info = {"mixing": pooled.info}
        if src is not None:
            sem_rows = semantic_query_rows(z.shape[0], cfg.max_queries, cfg.seed)
            text_graph = _knn(cfg, src, timer, sem_rows)
            sub_graph = _knn(cfg, z, timer, sem_rows)
            with timer.stage("metrics"):
                met.update(semantic_metrics(src, z, k=cfg.k, seed=cfg.seed, n_pairs=cfg.n_pairs, query_rows=sem_rows,
                                            text_neighbours=text_graph.neighbours,
                                            substitute_neighbours=sub_graph.neighbours))
            knn_info.update(source=text_graph.info, substitute=sub_graph.info)
        return met, knn_info

    for f in folders:
        z = _unit(f)
        y = _unit(f, "src") if f.src is not None else None
        met, knn_info = audit_one(f.label, z, f.norms, y, f.moments)
        scalars, arrays = split_scalars(met)
        curves["covariance_spectrum"][f.label] = arrays["covariance_spectrum"]
        cosines[f.label] = pairwise_cosines(z, n_pairs=cfg.n_pairs, seed=cfg.seed)
        pca_groups[f.label] = z
        units[f.label] = y if y is not None else None
        rows.append({**f.summary(), "metrics": scalars, "knn": knn_info, "skipped": f.skipped, "reference": False})

    source_label = next((f.label for f in folders if units.get(f.label) is not None), None)
    if source_label is not None:
        y0 = units[source_label]
        cosines["source text"] = pairwise_cosines(y0, n_pairs=cfg.n_pairs, seed=cfg.seed)
        curves["covariance_spectrum"]["source text"] = covariance_spectrum(moments(y0).covariance)
        pca_groups["source text"] = y0
        if cfg.source_baseline:
            f0 = next(f for f in folders if f.label == source_label)
            met, knn_info = audit_one("source text", y0, norm_stats(f0.src), None)  # src: the sampled rows
            scalars, _ = split_scalars(met)
            rows.append({"label": f"source text ({source_label})", "path": f0.path, "n_sampled": f0.n,
                         "n_total": f0.n_total, "metrics": scalars, "knn": knn_info, "reference": True})
    elif cfg.source_baseline:
        warnings.append("--source-baseline: no shard folder keeps src.npy, so there is no source-text row")

    # --------------------------------------------------------------- paired
    paired_info = None
    if paired:
        p_img, p_txt = paired
        xp, yp = _unit(p_img), _unit(p_txt)
        with timer.stage("paired"):
            for row in rows:
                if row["reference"]:
                    continue
                rep = paired_metrics(xp, yp, aligners[row["label"]], k=cfg.k, seed=cfg.seed, n_pairs=cfg.n_pairs,
                                     n_permutations=cfg.n_permutations, max_queries=cfg.max_queries)
                scalars, arrays = split_scalars(rep)
                row["metrics"].update({f"paired_{k}": v for k, v in scalars.items()})
                row["paired_curves"] = arrays
                curves["residual_spectrum"][row["label"]] = arrays["residual_spectrum"]
            base = paired_metrics(xp, yp, None, k=cfg.k, seed=cfg.seed, n_pairs=cfg.n_pairs,
                                  n_permutations=cfg.n_permutations, max_queries=cfg.max_queries)
        scalars, arrays = split_scalars(base)
        curves["residual_spectrum"]["text (no align)"] = arrays["residual_spectrum"]
        rows.append({"label": "text (no align), paired", "path": p_txt.path, "n_sampled": p_txt.n,
                     "n_total": p_txt.n_total, "metrics": {f"paired_{k}": v for k, v in scalars.items()},
                     "paired_curves": arrays, "reference": True})
        paired_info = {**p_img.summary(), "text_path": p_txt.path}

    # ---------------------------------------------------------------- gates
    gate_result = evaluate_gates(gates, {r["label"]: r["metrics"] for r in rows if not r["reference"]})

    # ------------------------------------------------------- report + plots
    skipped = [s for f in [images, *folders] for s in f.skipped]
    report = {
        "format": "anisogen-audit", "format_version": 1, "complete": True,
        "command": list(sys.argv),
        "settings": {k: v for k, v in asdict(cfg).items()
                     if k not in ("shards", "images", "out", "paired", "progress")},
        "versions": versions(),
        "d": d,
        "model_fingerprint": fingerprint,
        "images": {**images.summary(), "metrics": images.norms, "skipped": images.skipped},
        "paired": paired_info,
        "folders": rows,
        "curves": curves,
        "warnings": warnings,
        "gates": gate_result,
        "skipped_total": len(skipped),
    }
    if skipped:
        report["complete"] = False  # the audit ran, but not over all the data it was given
        lines = "".join(json.dumps(json_safe(s), sort_keys=True) + "\n" for s in skipped)
        atomic_write_bytes(out / "rejects.jsonl", lines.encode("utf-8"))

    with timer.stage("plots"):
        figures = make_figures(out, rows, curves, cosines, pca_groups, k=cfg.k, seed=cfg.seed)
    report["plots"] = [rel for rel, _, _ in figures]
    with timer.stage("html"):
        atomic_write_bytes(out / "report.html", render_html(json_safe(report), figures, out).encode("utf-8"))
    report["timings"] = {**{k: round(v, 3) for k, v in timer.seconds.items()},
                         "total": round(time.perf_counter() - total_start, 3),
                         "scan_steps": {s.label: {k: round(v, 3) for k, v in s.seconds.items()}
                                        for s in [images, *folders]}}
    atomic_write_json(out / "report.json", json_safe(report), indent=1)
    return report


def _read_inputs(cfg: AuditConfig, labels: list[str], timer: Timer):
    """Scan the images and every shard folder (in ``cfg.workers`` processes) and read the paired set."""
    with timer.stage("scan"), TaskPool(cfg.workers, min_work=PARALLEL_MIN_ROWS) as pool:
        common = dict(max_samples=cfg.max_samples, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt,
                      progress=cfg.progress, verify=cfg.verify, pool=pool)
        images = load_images(cfg.images, **common)
        folders = [load_shard_folder(p, label=lab, **common) for p, lab in zip(cfg.shards, labels)]
    with timer.stage("paired"):
        paired = load_paired(cfg.paired, max_samples=cfg.paired_max_samples, seed=cfg.seed) if cfg.paired else None
    return images, folders, paired


def make_figures(out: Path, rows: list[dict], curves: dict, cosines: dict, pca_groups: dict, *, k: int,
                 seed: int) -> list[tuple[str, str, str]]:
    """Write every PNG under ``out/plots``; returns (relative path, title, caption) triples."""
    labels = [r["label"] for r in rows if not r["reference"]]
    colours = {"images": plots.IMAGE_COLOUR, "source text": plots.TEXT_COLOUR, "text (no align)": plots.TEXT_COLOUR,
               **plots.folder_colours(labels)}
    figs = []
    rel = "plots/covariance_spectrum.png"
    plots.plot_spectra(out / rel, curves["covariance_spectrum"], colours, title="Covariance")
    figs.append((rel, "Covariance spectra", "Eigenvalues λ_j/tr of each set's covariance (log-log) and the "
                 "cumulative energy E(K); substitutes should follow the images' curve."))
    if curves["residual_spectrum"]:
        rel = "plots/residual_spectrum.png"
        plots.plot_spectra(out / rel, curves["residual_spectrum"], colours, title="Paired residual")
        figs.append((rel, "Residual spectra per method (paired set)", "Eigenvalues λ_j/tr of the uncentred residual "
                     "second moment of r_i = x_i − z_i, and its cumulative energy; a spike at j = 1 is a leftover "
                     "centroid gap, a steep curve an anisotropic residual (A_r(T))."))
    rel = "plots/pairwise_cosines.png"
    js = {r["label"]: r["metrics"]["JS_cos"] for r in rows if "JS_cos" in r["metrics"] and not r["reference"]}
    plots.plot_cosine_histograms(out / rel, cosines, colours, js=js)
    figs.append((rel, "Pairwise-cosine distributions", "Cosines of random pairs inside each set; the legend gives "
                 "the Jensen-Shannon divergence of each substitute set's KDE to the images' (JS_cos, nats)."))
    rel = "plots/knn_mixing.png"
    plots.plot_knn_mixing(out / rel, {r["label"]: r["metrics"] for r in rows if not r["reference"]}, colours, k=k)
    figs.append((rel, "kNN modality mixing", "M_k^Z / M_k^X: neighbourhood label entropy of substitutes / images in "
                 "the pooled set, normalised by its value under random labels (1 = as mixed as random labels, 0 = "
                 "separated; "
                 "above 1 when neighbourhoods are closer to half images than the pool is, which happens when the two "
                 "sets differ in size); "
                 "NN is image: share of substitutes whose nearest neighbour is an image."))
    rng = np.random.default_rng(seed)
    sample = {lab: (g if len(g) <= PCA_ROWS else g[np.sort(rng.choice(len(g), PCA_ROWS, replace=False))])
              for lab, g in pca_groups.items()}
    context = ["images"] + (["source text"] if "source text" in sample else [])
    panels = [context + [lab] for lab in labels]
    rel = "plots/pca.png"
    plots.plot_pca(out / rel, sample, colours, panels=panels)
    figs.append((rel, "2-D PCA projection", f"Images, source texts and each folder's substitutes projected on the "
                 f"top two principal components of their joint sample (≤ {PCA_ROWS} rows per set)."))
    return figs
