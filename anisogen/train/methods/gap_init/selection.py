"""SPOT-Gap layer scores (appendix C, Alg. 2) and layer selection (§4.4 GG-Safe, G.5 naive)."""

from __future__ import annotations

from typing import Sequence

import torch

def _knn_mean_dist(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) mean L2 distance to the k nearest other rows, and (N, k) their indices."""
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    vals, idx = torch.topk(d, k, dim=1, largest=False)
    return vals.mean(1), idx


def spot_gap_scores(
    text: torch.Tensor,
    visual: torch.Tensor,
    *,
    k: int = 5,
    alpha_sem: float = 1.0,
    alpha_geom: float = 1.0,
) -> torch.Tensor:
    """Layer-wise SPOT-Gap score S_gap^(l) (appendix C, Alg. 2).

    Args:
        text, visual: (N, L, H) paired per-sample hidden states (:class:`GapStats` fields).
        k: neighbourhood size (clamped to N-1).
        alpha_sem, alpha_geom: weights of the semantic and geometric terms (unspecified in the paper).
    Per layer: s_sem,i = ||t_i - v_i|| (C.1); d_v,i / d_t,i = mean distance to the k nearest
    neighbours within each modality (self excluded); s_geom,i = |d_t,i - d_v,i| (C.2); the combined
    score is averaged over the k nearest paired samples N_k(i), found in the concatenated [t_i, v_i]
    space, self excluded (C.3); S = mean_i (C.4).
    Returns:
        (L,) float64.
    """
    if text.shape != visual.shape or text.dim() != 3:
        raise ValueError(f"text/visual must both be (N, L, H); got {tuple(text.shape)} and {tuple(visual.shape)}")
    n = text.shape[0]
    if n < 2:
        raise ValueError("SPOT-Gap needs at least 2 calibration samples")
    k = min(int(k), n - 1)
    scores = []
    for li in range(text.shape[1]):
        t, v = text[:, li].double(), visual[:, li].double()
        s_sem = (t - v).norm(dim=1)
        d_t, _ = _knn_mean_dist(t, k)
        d_v, _ = _knn_mean_dist(v, k)
        s_geom = (d_t - d_v).abs()
        comb = alpha_sem * s_sem + alpha_geom * s_geom
        _, nbr = _knn_mean_dist(torch.cat([t, v], dim=1), k)
        smoothed = comb[nbr].mean(1)
        scores.append(smoothed.mean())
    return torch.stack(scores)


def select_layers(
    num_layers: int,
    *,
    strategy: str = "last",
    n: int = 6,
    scores: Sequence[float] | torch.Tensor | None = None,
    score_layers: Sequence[int] | None = None,
    skip_first: int = 0,
) -> list[int]:
    """Decoder layers that get adapters.

    ``last``: the last ``n`` layers (paper's naive default, top-6). ``ggsafe``: the ``n`` layers with
    the highest SPOT-Gap ``scores`` (given for ``score_layers``, default all), excluding the first
    ``skip_first`` layers ("safety"; the paper excludes early vision-encoder layers, which we do not
    adapt, so the default is 0). Returned sorted ascending.
    """
    n = max(1, min(int(n), num_layers))
    if strategy == "last":
        return list(range(num_layers - n, num_layers))
    if strategy != "ggsafe":
        raise ValueError(f"layer strategy must be 'last' or 'ggsafe', got {strategy!r}")
    if scores is None:
        raise ValueError("ggsafe layer selection needs SPOT-Gap scores")
    score_layers = list(range(num_layers)) if score_layers is None else list(score_layers)
    sc = [float(s) for s in scores]
    cand = [(s, li) for s, li in zip(sc, score_layers) if li >= skip_first]
    if not cand:
        raise ValueError(f"ggsafe: no layer left after skipping the first {skip_first}")
    cand.sort(key=lambda x: (-x[0], x[1]))
    return sorted(li for _, li in cand[:n])

