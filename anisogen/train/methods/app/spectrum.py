"""Projector task-vector spectrum (APP appendix A): singular values and cumulative energy per matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from .config import AppConfig
from .merge import svd_truncate, task_vector


def projector_spectrum(pre_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor], out_dir: str | Path,
                       config: AppConfig | None = None) -> dict:
    """Singular values of tau per projector matrix + cumulative energy; writes ``spectrum.json/png``.

    ``config``: an ``AppConfig`` whose k rule is marked on the plot (default energy 0.8).
    Returns ``{name: {"spectrum", "cumulative_energy", "k", "rank", "retained_energy"}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = config or AppConfig()
    tau = task_vector(pre_sd, ft_sd)
    mats = {n: t for n, t in sorted(tau.items()) if t.dim() == 2}
    if not mats:
        raise ValueError("no 2-D weight matrix in the projector state dicts")
    res = {}
    for n, t in mats.items():
        mode = config.mode if config.mode in ("energy", "ratio") else "energy"
        _, info = svd_truncate(t, mode=mode, k_ratio=config.k_ratio, energy=config.energy, min_k=config.min_k)
        s = torch.tensor(info["spectrum"], dtype=torch.float64)
        cum = (torch.cumsum(s**2, 0) / (s**2).sum()).tolist() if float(s.sum()) > 0 else [1.0] * len(s)
        res[n] = {"spectrum": info["spectrum"], "cumulative_energy": cum, "k": info["k"], "rank": info["rank"],
                  "retained_energy": info["retained_energy"]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(res), figsize=(5.2 * len(res), 3.8), dpi=110, squeeze=False)
    for ax, (n, r) in zip(axes[0], res.items()):
        xs = range(1, len(r["spectrum"]) + 1)
        ax.semilogy(xs, [max(v, 1e-30) for v in r["spectrum"]], color="tab:blue", label="singular value")
        ax.set_xlabel("component i")
        ax.set_ylabel("sigma_i", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, r["cumulative_energy"], color="tab:red", label="cumulative energy")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("sum_{j<=i} sigma_j^2 / sum sigma^2", color="tab:red")
        ax.axvline(r["k"], color="gray", ls="--")
        ax.set_title(f"{n}: k={r['k']}/{r['rank']} ({r['retained_energy']:.1%} energy)")
    fig.tight_layout()
    fig.savefig(out_dir / "spectrum.png")
    plt.close(fig)
    (out_dir / "spectrum.json").write_text(json.dumps({"config": config.to_dict(), "matrices": res}, indent=2))
    return res
