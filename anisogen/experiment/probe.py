"""The transfer probe: do substitutes stand in for images? (cheap, high-power, no LM involved)

For each aligner, attribute classifiers are trained on the *substitutes* of the train captions and
tested on *real* held-out image embeddings; a retrieval test ranks each held-out scene's real image
among all held-out images for the substitute of that scene's caption. Per-scene scores come back as
arrays, so the study can put paired bootstrap confidence intervals on differences between aligners
(:func:`paired_bootstrap`) and turn goals into holds / fails / undecided (:func:`verdict`).

Labels per scene (:func:`scene_labels`):

* multi-label sets: the colours, shapes, sizes and regions of its objects (one scene names each
  value at most once per group) -- scored per scene by the F1 of the predicted set (sigmoid > 0.5);
* one-of-k: the object count (1-3) and the background colour -- scored by argmax accuracy.

Classifiers (:func:`train_probe`): ``linear`` (multi-output logistic regression) and ``mlp`` (one
hidden layer of 256, GELU). Both train full-batch with AdamW for a fixed number of steps; their
settings are fixed here, never chosen on evaluation data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..toyworld.scenes import BACKGROUNDS, COLORS, MAX_OBJECTS, REGIONS, SHAPES, SIZES

MULTI = {"color": COLORS, "shape": SHAPES, "size": SIZES, "region": REGIONS}
ONE_OF = {"count": tuple(str(i) for i in range(1, MAX_OBJECTS + 1)), "background": BACKGROUNDS}
PROBE_SETTINGS = {"steps": 400, "lr": 1e-2, "weight_decay": 1e-4, "hidden": 256}


@dataclass
class Labels:
    """``y`` (N, L) float32 multi-hot; ``groups`` name -> column slice; ``multi`` names of set groups."""

    y: np.ndarray
    groups: dict
    multi: tuple


def scene_labels(scenes) -> Labels:
    """Multi-hot attribute labels of toy-world scenes (see the module docstring)."""
    groups, start = {}, 0
    for name, vocab in list(MULTI.items()) + list(ONE_OF.items()):
        groups[name] = slice(start, start + len(vocab))
        start += len(vocab)
    y = np.zeros((len(scenes), start), dtype=np.float32)
    for i, s in enumerate(scenes):
        for o in s.objects:
            for name, vocab in MULTI.items():
                y[i, groups[name].start + vocab.index(getattr(o, name))] = 1.0
        y[i, groups["count"].start + s.n_objects - 1] = 1.0
        y[i, groups["background"].start + BACKGROUNDS.index(s.background)] = 1.0
    return Labels(y, groups, tuple(MULTI))


def train_probe(x: np.ndarray, labels: Labels, *, kind: str = "linear", seed: int = 0) -> nn.Module:
    """Fit a ``linear`` or ``mlp`` probe on (N, d) embeddings (L2-normalised here) -> label logits."""
    if kind not in ("linear", "mlp"):
        raise ValueError(f"probe kind must be 'linear' or 'mlp', got {kind!r}")
    torch.manual_seed(seed)
    d, n_out, h = x.shape[1], labels.y.shape[1], PROBE_SETTINGS["hidden"]
    net = nn.Linear(d, n_out) if kind == "linear" else nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, n_out))
    xt, yt = _unit(x), torch.from_numpy(labels.y)
    opt = torch.optim.AdamW(net.parameters(), lr=PROBE_SETTINGS["lr"], weight_decay=PROBE_SETTINGS["weight_decay"])
    for _ in range(PROBE_SETTINGS["steps"]):
        opt.zero_grad()
        _probe_loss(net(xt), yt, labels).backward()
        opt.step()
    return net.eval()


def _probe_loss(logits: torch.Tensor, y: torch.Tensor, labels: Labels) -> torch.Tensor:
    loss = 0.0
    for name, sl in labels.groups.items():
        if name in labels.multi:
            loss = loss + nn.functional.binary_cross_entropy_with_logits(logits[:, sl], y[:, sl])
        else:
            loss = loss + nn.functional.cross_entropy(logits[:, sl], y[:, sl].argmax(1))
    return loss


def _unit(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return nn.functional.normalize(t, dim=1)


@torch.no_grad()
def probe_scores(net: nn.Module, x: np.ndarray, labels: Labels) -> dict[str, np.ndarray]:
    """Per-scene scores on (N, d) embeddings: set F1 for multi-label groups, accuracy for one-of-k
    groups, and their unweighted ``mean``. Each value is an (N,) float64 array."""
    logits = net(_unit(x))
    out = {}
    for name, sl in labels.groups.items():
        truth = torch.from_numpy(labels.y[:, sl]) > 0.5
        if name in labels.multi:
            pred = logits[:, sl] > 0
            tp = (pred & truth).sum(1).double()
            denom = pred.sum(1).double() + truth.sum(1).double()
            out[name] = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(tp)).numpy()
        else:
            out[name] = (logits[:, sl].argmax(1) == truth.double().argmax(1)).double().numpy()
    out["mean"] = np.mean([out[n] for n in labels.groups], axis=0)
    return out


def retrieval_ranks(queries: np.ndarray, gallery: np.ndarray) -> dict:
    """Rank (1 = best) of gallery row i for query row i by cosine, plus R@1, R@5 and the median rank.
    Ties count against the match (a constant query ranks last), so no score is won by a tie."""
    q, g = _unit(queries), _unit(gallery)
    if q.shape != g.shape:
        raise ValueError(f"queries {tuple(q.shape)} and gallery {tuple(g.shape)} must pair row by row")
    sims = q @ g.T
    own = sims.diagonal()[:, None]
    ranks = (sims >= own).sum(1).numpy().astype(np.int64)  # itself included: 1 + others at least as close
    return {"ranks": ranks, "r1": float(np.mean(ranks <= 1)), "r5": float(np.mean(ranks <= 5)),
            "median_rank": float(np.median(ranks))}


def paired_bootstrap(a: np.ndarray, b: np.ndarray | None = None, *, n_boot: int = 2000, seed: int = 0,
                     ratio: bool = False) -> dict:
    """95 % percentile CI of mean(a) - mean(b) (or mean(a) / mean(b) with ``ratio``, or mean(a) when
    ``b`` is None) by resampling the same scenes for both (paired).

    ``a`` and ``b`` are per-scene scores (N,) or, for runs repeated over training seeds, (seeds, N): then
    every resample also draws the seeds of each side with replacement (independently, since the two
    sides' seeds are different runs), so the interval covers the seed-to-seed spread as well."""
    a2 = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b2 = None if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    if b2 is not None and a2.shape[1] != b2.shape[1]:
        raise ValueError(f"paired scores must cover the same scenes, got {a2.shape} and {b2.shape}")
    n = a2.shape[1]
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(row, minlength=n) for row in rng.integers(0, n, size=(n_boot, n))])

    def boot_means(x):  # (n_boot,) means over resampled scenes and (when x has several rows) seeds
        per_seed = x @ counts.T / n  # (seeds, n_boot)
        if len(x) == 1:
            return per_seed[0]
        pick = rng.integers(0, len(x), size=(n_boot, len(x)))
        return np.take_along_axis(per_seed.T, pick, axis=1).mean(1)

    ma = boot_means(a2)
    if b2 is None:
        boots, est = ma, a2.mean()
    else:
        mb = boot_means(b2)
        boots, est = (ma / mb, a2.mean() / b2.mean()) if ratio else (ma - mb, a2.mean() - b2.mean())
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"estimate": float(est), "lo": float(lo), "hi": float(hi), "half_width": float((hi - lo) / 2)}


def std_ratio_ci(a, b) -> dict:
    """Ratio std(a) / std(b) of two independent samples (seed-to-seed spreads) with its 95 % CI from the
    F distribution of the variance ratio (normal samples; ``n - 1`` degrees of freedom each)."""
    try:
        from scipy import stats
    except ImportError as e:
        raise ImportError("the seed-std ratio CI needs scipy: pip install 'anisogen[experiment]'") from e

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a standard-deviation ratio needs at least two values on each side")
    va, vb = a.var(ddof=1), b.var(ddof=1)
    if vb == 0:
        return {"estimate": float("inf") if va > 0 else float("nan"), "lo": float("nan"), "hi": float("nan"),
                "half_width": float("nan")}
    r = va / vb
    da, db = len(a) - 1, len(b) - 1
    lo, hi = r / stats.f.ppf(0.975, da, db), r / stats.f.ppf(0.025, da, db)
    return {"estimate": float(np.sqrt(r)), "lo": float(np.sqrt(lo)), "hi": float(np.sqrt(hi)),
            "half_width": float((np.sqrt(hi) - np.sqrt(lo)) / 2)}


def verdict(ci: dict, threshold: float = 0.0, *, greater: bool = True) -> str:
    """``holds`` when the whole CI is on the goal's side of ``threshold``, ``fails`` when it is wholly on
    the other side, else ``undecided``."""
    lo, hi = ci["lo"], ci["hi"]
    if greater:
        return "holds" if lo > threshold else "fails" if hi < threshold else "undecided"
    return "holds" if hi < threshold else "fails" if lo > threshold else "undecided"


def probe_condition(train_emb: np.ndarray, train_labels: Labels, evals: dict, *, queries: np.ndarray | None = None,
                    gallery: np.ndarray | None = None, seed: int = 0) -> dict:
    """Both probes trained on one condition's training embeddings and scored on each evaluation set.

    ``evals``: ``{split: (real embeddings (N, d), Labels)}``. Returns ``{"linear"|"mlp": {split: {"mean",
    "per_attribute", "per_scene"}}, "retrieval": {...}}`` (retrieval when ``queries``/``gallery`` are given:
    the substitutes of the held-out captions against the real held-out images)."""
    out = {}
    for kind in ("linear", "mlp"):
        net = train_probe(train_emb, train_labels, kind=kind, seed=seed)
        out[kind] = {}
        for split, (x, lab) in evals.items():
            sc = probe_scores(net, x, lab)
            out[kind][split] = {"mean": float(sc["mean"].mean()),
                                "per_attribute": {k: float(v.mean()) for k, v in sc.items() if k != "mean"},
                                "per_scene": sc["mean"].tolist()}
    if queries is not None and gallery is not None:
        r = retrieval_ranks(queries, gallery)
        out["retrieval"] = {"r1": r["r1"], "r5": r["r5"], "median_rank": r["median_rank"],
                            "per_scene_r1": (r["ranks"] <= 1).astype(float).tolist()}
    return out
