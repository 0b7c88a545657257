"""PNG figures of the audit report (matplotlib, Agg backend; no display needed).

Each function takes plain arrays / dicts, writes one PNG at ``path`` (dpi 110) and returns the path.
Colours: images black, source texts grey, one colour per shard folder (same order everywhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

IMAGE_COLOUR = "#111111"
TEXT_COLOUR = "#9a9a9a"
DPI = 110
#: Labels of the text reference curves (drawn dashed, grey).
REFERENCE_TEXT = ("source text", "text (no align)")


def folder_colours(labels: Sequence[str]) -> dict[str, str]:
    """A stable colour per folder label (tab10 cycle)."""
    cycle = plt.get_cmap("tab10").colors
    return {label: matplotlib.colors.to_hex(cycle[i % len(cycle)]) for i, label in enumerate(labels)}


def _is_reference(label: str, colours: Mapping[str, str]) -> bool:
    """Images and the text reference curves (drawn thin, on top of the folders)."""
    return label in REFERENCE_TEXT or colours.get(label) == IMAGE_COLOUR


def _draw_order(labels: Sequence[str], colours: Mapping[str, str]) -> list[tuple[str, dict]]:
    """(label, line style) in drawing order: shard folders first, widest first, then images / texts on top.

    Two folders with the same curve (e.g. centroid and ReAlign share a covariance) would otherwise hide
    each other; with decreasing widths every colour stays visible as a band around the next.
    """
    folders = [lab for lab in labels if not _is_reference(lab, colours)]
    refs = [lab for lab in labels if _is_reference(lab, colours)]
    widths = np.linspace(4.0, 1.6, len(folders)) if len(folders) > 1 else [1.8]
    out = [(lab, {"color": colours.get(lab), "lw": float(w), "ls": "-", "zorder": 2 + i})
           for i, (lab, w) in enumerate(zip(folders, widths))]
    out += [(lab,
             {"color": colours.get(lab), "lw": 1.2, "ls": "--" if lab in REFERENCE_TEXT else "-", "zorder": 20 + i})
            for i, lab in enumerate(refs)]
    return out


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def plot_spectra(path, spectra: Mapping[str, np.ndarray], colours: Mapping[str, str], *, title: str,
                 ylabel: str = "λ_j / tr") -> Path:
    """Left: normalised eigenvalue spectra λ_j/tr (log y) per curve; right: cumulative energy E(K) vs K/d.

    ``spectra``: label -> (d,) descending eigenvalues divided by their sum. An isotropic K/d line is drawn
    for reference on the right.
    """
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for label, style in _draw_order(list(spectra), colours):
        lam = np.asarray(spectra[label], dtype=np.float64)
        j = np.arange(1, lam.size + 1)
        ax_s.plot(j, np.clip(lam, 1e-12, None), label=label, **style)
        ax_e.plot(j / lam.size, np.cumsum(lam) / max(lam.sum(), 1e-300), label=label, **style)
    d = max((np.asarray(v).size for v in spectra.values()), default=1)
    # the last few eigenvalues of a rank-deficient covariance are rounding noise: keep them off the y-range
    body = [np.asarray(v)[: max(1, int(0.95 * np.asarray(v).size))] for v in spectra.values()]
    floor = min(float(np.min(np.clip(b, 1e-12, None))) for b in body) if body else 1e-12
    ax_s.set_ylim(bottom=max(floor / 3, 1e-10))
    ax_e.plot([0, 1], [0, 1], ls=":", color="#bbbbbb", label="isotropic (K/d)")
    ax_s.set(yscale="log", xscale="log", xlabel="eigenvalue index j", ylabel=ylabel, title=f"{title}: spectrum")
    ax_e.set(xlabel=f"K / d  (d = {d})", ylabel="cumulative energy E(K)", title=f"{title}: cumulative energy",
             xlim=(0, 1), ylim=(0, 1.01))
    ax_s.grid(alpha=0.3, which="both")
    ax_e.grid(alpha=0.3)
    _legend_in_spectrum_order(ax_e, list(spectra), fontsize=8, loc="lower right")
    return _save(fig, path)


def _legend_in_spectrum_order(ax, labels: Sequence[str], **kwargs) -> None:
    """Legend listing the curves in the caller's order (images first), whatever order they were drawn in."""
    handles, names = ax.get_legend_handles_labels()
    by_name = dict(zip(names, handles))
    order = [lab for lab in labels if lab in by_name] + [n for n in names if n not in labels]
    ax.legend([by_name[n] for n in order], order, **kwargs)


def plot_cosine_histograms(path, cosines: Mapping[str, np.ndarray], colours: Mapping[str, str],
                           js: Mapping[str, float] | None = None, bins: int = 120) -> Path:
    """Density histograms of pairwise cosines per set (images, source texts, substitutes of each folder).

    ``js``: optional label -> JS divergence to the images, shown in the legend.
    """
    fig, ax = plt.subplots(figsize=(8, 4.2))
    lo = min(float(np.min(c)) for c in cosines.values())
    hi = max(float(np.max(c)) for c in cosines.values())
    edges = np.linspace(max(-1.0, lo - 0.02), min(1.0, hi + 0.02), bins + 1)
    names = {}
    for label, style in _draw_order(list(cosines), colours):
        names[label] = label if not js or label not in js else f"{label} (JS {js[label]:.4f})"
        if colours.get(label) == IMAGE_COLOUR:  # the target distribution: a filled grey area under everything
            ax.hist(cosines[label], bins=edges, density=True, histtype="stepfilled", alpha=0.25, color=IMAGE_COLOUR,
                    label=names[label], zorder=1)
        else:
            ax.hist(cosines[label], bins=edges, density=True, histtype="step", label=names[label], **style)
    ax.set(xlabel="cosine similarity of random pairs within a set", ylabel="density",
           title="Pairwise-cosine distributions (JS divergence to images in nats)")
    ax.grid(alpha=0.3)
    _legend_in_spectrum_order(ax, [names[lab] for lab in cosines], fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_knn_mixing(path, rows: Mapping[str, Mapping[str, float]], colours: Mapping[str, str], *, k: int) -> Path:
    """Grouped bars per folder: ``M_k_Z``, ``M_k_X`` and ``nn_is_image_frac_Z`` (with its chance level)."""
    metrics = [("M_k_Z", r"$M_k^Z$ (substitutes)"), ("M_k_X", r"$M_k^X$ (images)"),
               ("nn_is_image_frac_Z", "NN of substitute is an image")]
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(labels) * len(metrics) + 3), 4))
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(metrics))
    for i, label in enumerate(labels):
        vals = [rows[label].get(m, np.nan) for m, _ in metrics]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=label, color=colours.get(label))
        for bar, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
        chance = rows[label].get("nn_is_image_chance")
        if chance is not None:
            cx = x[2] + (i - (len(labels) - 1) / 2) * width
            ax.plot([cx - width / 2, cx + width / 2], [chance, chance], color="#444444", ls="--", lw=1)
    ax.set_xticks(x, [name for _, name in metrics])
    finite = [v for lab in labels for v in (rows[lab].get(m) for m, _ in metrics)
              if v is not None and np.isfinite(v)]
    top = max([1.0, *finite]) + 0.12
    ax.set(ylabel="score", ylim=(0, top), title=f"kNN modality mixing (k = {k}; 1 = as mixed as random labels, 0 = "
                                                f"separated; "
                                                f"dashes: NN-is-image at chance)")
    ax.axhline(1.0, color="#bbbbbb", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_pca(path, groups: Mapping[str, np.ndarray], colours: Mapping[str, str], *, panels: Sequence[Sequence[str]]
             ) -> Path:
    """2-D PCA of the joint sample of all ``groups`` (label -> (n, d) unit rows), one panel per entry of
    ``panels`` (each a list of group labels drawn in that panel, e.g. images + texts + one folder)."""
    joint = np.vstack(list(groups.values()))
    mean = joint.mean(axis=0)
    _, s, vt = np.linalg.svd(joint - mean, full_matrices=False)
    basis = vt[:2].T
    explained = (s[:2] ** 2) / np.sum(s**2)
    proj = {label: (x - mean) @ basis for label, x in groups.items()}
    allp = np.vstack(list(proj.values()))
    pad = 0.05 * (allp.max(axis=0) - allp.min(axis=0))
    lims = list(zip(allp.min(axis=0) - pad, allp.max(axis=0) + pad))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 0.6, 4.6), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    for n_ax, (ax, panel) in enumerate(zip(axes[0], panels)):
        for label in panel:
            p = proj[label]
            ax.scatter(p[:, 0], p[:, 1], s=7, alpha=0.45, color=colours.get(label), label=f"{label} ({len(p)})",
                       rasterized=True, linewidths=0)
        ax.set(xlim=lims[0], ylim=lims[1], xlabel=f"PC1 ({explained[0]:.1%})")
        if n_ax == 0:
            ax.set_ylabel(f"PC2 ({explained[1]:.1%})")
        ax.set_title(panel[-1], fontsize=9)
        legend = ax.legend(fontsize=7, markerscale=4, loc="upper right")
        for handle in legend.legend_handles:
            handle.set_alpha(1.0)
        ax.grid(alpha=0.3)
    fig.suptitle("PCA of the joint sample (one basis for all panels)", fontsize=10)
    return _save(fig, path)
