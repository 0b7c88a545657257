"""The transfer probe: labels, probes, retrieval ranks, paired bootstrap CIs and goal verdicts."""

import numpy as np
import pytest

from anisogen.experiment.probe import (
    ONE_OF, paired_bootstrap, probe_scores, retrieval_ranks, scene_labels, std_ratio_ci, train_probe, verdict,
)
from anisogen.toyworld.scenes import BACKGROUNDS, COLORS, REGIONS, SHAPES, SIZES, Scene, SceneObject, sample_scenes


def test_scene_labels_are_exact():
    s = Scene(objects=(SceneObject(SHAPES[0], COLORS[1], SIZES[0], REGIONS[0]),
                       SceneObject(SHAPES[2], COLORS[1], SIZES[1], REGIONS[3])), background=BACKGROUNDS[2],
              render_seed=7)
    lab = scene_labels([s])
    y, g = lab.y[0], lab.groups
    assert y[g["color"]].tolist() == [1.0 if c == COLORS[1] else 0.0 for c in COLORS]  # a set: named once
    assert y[g["shape"]].nonzero()[0].tolist() == [0, 2]
    assert y[g["region"]].nonzero()[0].tolist() == [0, 3]
    assert y[g["count"]].tolist() == [0.0, 1.0, 0.0][:len(ONE_OF["count"])]
    assert y[g["background"]].nonzero()[0].tolist() == [2]
    assert lab.y.shape[1] == sum(len(v) for v in (COLORS, SHAPES, SIZES, REGIONS, ONE_OF["count"], BACKGROUNDS))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_reads_labels_that_are_linearly_encoded(kind):
    train, test = sample_scenes(1500, "train", 0), sample_scenes(400, "heldout", 0)
    ltr, lte = scene_labels(train), scene_labels(test)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((ltr.y.shape[1], 64))
    enc = lambda y: y @ w + 0.05 * rng.standard_normal((len(y), 64))  # noqa: E731
    net = train_probe(enc(ltr.y), ltr, kind=kind, seed=0)
    s = probe_scores(net, enc(lte.y), lte)
    assert s["mean"].shape == (400,) and s["mean"].mean() > 0.95
    # a constant embedding carries nothing: the probe can only predict the majority answers
    blind = probe_scores(train_probe(np.ones((1500, 64)), ltr, kind=kind), np.ones((400, 64)), lte)
    assert blind["mean"].mean() < 0.6
    assert np.ptp(blind["count"]) <= 1 and len(set(blind["background"].tolist())) <= 2


def test_probe_is_deterministic():
    scenes = sample_scenes(200, "train", 1)
    lab = scene_labels(scenes)
    x = np.random.default_rng(1).standard_normal((200, 16))
    a = probe_scores(train_probe(x, lab, kind="mlp", seed=3), x, lab)["mean"]
    b = probe_scores(train_probe(x, lab, kind="mlp", seed=3), x, lab)["mean"]
    assert np.array_equal(a, b)


def test_retrieval_ranks_match_brute_force():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((50, 8))
    assert retrieval_ranks(g, g)["r1"] == 1.0
    q = g + 0.8 * rng.standard_normal(g.shape)
    r = retrieval_ranks(q, g)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = qn @ gn.T
    want = np.array([1 + int(np.sum(sims[i] > sims[i, i])) for i in range(50)])
    assert np.array_equal(r["ranks"], want)
    assert r["r1"] == np.mean(want == 1) and r["r5"] == np.mean(want <= 5) and r["median_rank"] == np.median(want)
    tied = retrieval_ranks(np.ones((5, 3)), np.ones((5, 3)))  # no information: every match ranks last
    assert tied["ranks"].tolist() == [5] * 5 and tied["r1"] == 0.0


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(3)
    a = rng.random(1000)
    ci = paired_bootstrap(a + 0.25, a)  # a constant paired difference: no uncertainty
    assert ci["estimate"] == pytest.approx(0.25) and ci["lo"] == pytest.approx(0.25) and ci["hi"] == pytest.approx(0.25)
    b = rng.normal(0.1, 1.0, 4000)
    c = paired_bootstrap(b, np.zeros_like(b), seed=1)
    assert c["lo"] < 0.1 < c["hi"]
    assert c["half_width"] == pytest.approx(1.96 / np.sqrt(4000), rel=0.15)  # the normal-theory width
    r = paired_bootstrap(a + 1.0, np.full_like(a, 2.0), ratio=True)
    assert r["estimate"] == pytest.approx((a.mean() + 1.0) / 2.0)
    with pytest.raises(ValueError, match="same scenes"):
        paired_bootstrap(a, a[:10])


def test_bootstrap_over_seeds_and_scenes():
    rng = np.random.default_rng(5)
    base = rng.random(800)
    # three seeds that agree exactly: the same interval as one seed
    one = paired_bootstrap(base + 0.05, base, seed=2)
    three = paired_bootstrap(np.stack([base + 0.05] * 3), np.stack([base] * 3), seed=2)
    assert three["estimate"] == pytest.approx(0.05)
    assert three["lo"] == pytest.approx(one["lo"]) and three["hi"] == pytest.approx(one["hi"])
    # seeds that disagree widen the interval (seed spread is part of the uncertainty)
    spread = np.stack([base + 0.05 + d for d in (-0.02, 0.0, 0.02)])
    wide = paired_bootstrap(spread, np.stack([base] * 3), seed=2)
    assert wide["estimate"] == pytest.approx(0.05) and wide["half_width"] > 3 * one["half_width"]
    assert wide["lo"] >= 0.03 - 1e-9 and wide["hi"] <= 0.07 + 1e-9  # never beyond the extreme seeds


def test_std_ratio_interval_is_the_f_interval():
    from scipy import stats

    a, b = [0.50, 0.52, 0.51, 0.49, 0.50], [0.40, 0.50, 0.60, 0.45, 0.55]
    ci = std_ratio_ci(a, b)
    r = np.var(a, ddof=1) / np.var(b, ddof=1)
    assert ci["estimate"] == pytest.approx(np.sqrt(r))
    assert ci["hi"] == pytest.approx(np.sqrt(r / stats.f.ppf(0.025, 4, 4)))
    assert ci["lo"] == pytest.approx(np.sqrt(r / stats.f.ppf(0.975, 4, 4)))
    assert verdict(ci, 1.0, greater=False) == "holds"  # 0.11 with an upper end below 1
    with pytest.raises(ValueError, match="at least two"):
        std_ratio_ci([0.5], b)


def test_verdicts():
    assert verdict({"lo": 0.01, "hi": 0.03}) == "holds"
    assert verdict({"lo": -0.03, "hi": -0.01}) == "fails"
    assert verdict({"lo": -0.01, "hi": 0.02}) == "undecided"
    assert verdict({"lo": 0.90, "hi": 0.99}, 0.95) == "undecided"
    assert verdict({"lo": 0.10, "hi": 0.20}, 0.5, greater=False) == "holds"
