"""The audit's metric dicts equal direct anisogen.geometry calls; the JS divergence is checked independently."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from anisogen.align import fit_aligner
from anisogen.audit.index import knn_graph
from anisogen.audit.metrics import (
    cosine_density, cosine_js, js_divergence, norm_stats, paired_metrics, pairwise_cosines, semantic_metrics,
    unpaired_metrics,
)
from anisogen.geometry import gap_report, knn_mixing, method_report
from anisogen.synthetic import make_paired_embeddings

SCALARS = ["Phi", "Psi", "Omega_k", "delta_mu", "M_k_Z", "M_k_X", "M_k_Z_raw", "M_k_X_raw", "nn_is_image_frac_Z",
           "A_r_T", "A_r_T_centered"]


@pytest.fixture(scope="module")
def world():
    pairs = make_paired_embeddings(1600, 24, gap=0.4, residual_rank=3, seed=7)
    fit_text, fit_image, held = pairs.split(800, seed=1)
    aligner = fit_aligner("realign", text=fit_text, image=fit_image, seed=0)
    z = aligner.transform(held.text).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return held.image, held.text, z, aligner


def test_unpaired_metrics_equal_geometry_on_equal_sized_sets(world):
    x, y, z, _ = world
    got = unpaired_metrics(x, z, k=10, seed=3, n_pairs=5000)
    gap = gap_report(image=x, text=z)  # same marginal statistics when both sets have N rows
    for key in ("C_lambda", "O_q", "G_Sigma", "O_q_random"):
        assert got[key] == pytest.approx(gap[key], rel=1e-10, abs=1e-12), key
    ref = method_report(image=x, text=y, substitute=z, k=10, seed=3, n_pairs=5000)
    for key in ("delta_mu", "M_k_Z", "M_k_X", "M_k_Z_raw", "M_k_X_raw", "nn_is_image_frac_Z"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-14), key
    assert got["q"] == gap["q"] == round(24 / 10)
    assert got["nn_is_image_chance"] == pytest.approx(len(x) / (2 * len(x) - 1))


def test_unpaired_metrics_on_unequal_sets_use_covariances_and_given_graph(world):
    x, _, z, _ = world
    x_part, z_part = x[:500], z[:300]
    graph = knn_graph(np.vstack([x_part, z_part]), k=8, kind="flat", device="cpu").neighbours
    got = unpaired_metrics(x_part, z_part, k=8, seed=0, neighbours=graph, n_pairs=4000)
    cx, cz = np.cov(x_part.T, bias=True), np.cov(z_part.T, bias=True)
    assert got["G_Sigma"] == pytest.approx(np.linalg.norm(cx - cz) / np.linalg.norm(cx), rel=1e-9)
    lx, lz = np.linalg.eigvalsh(cx)[::-1], np.linalg.eigvalsh(cz)[::-1]
    floor = lambda lam: np.log(np.clip(lam, lam.max() * 1e-12, None))  # noqa: E731  (rank-deficient: floored)
    assert got["C_lambda"] == pytest.approx(np.corrcoef(floor(lx), floor(lz))[0, 1], abs=1e-6)
    assert got["delta_mu"] == pytest.approx(np.linalg.norm(z_part.mean(0) - x_part.mean(0)), abs=1e-12)
    mix = knn_mixing(x_part, z_part, k=8, seed=0, neighbours=graph)
    for key, value in mix.items():
        assert got[key] == value
    np.testing.assert_allclose(got["covariance_spectrum"], np.clip(lz, 0, None) / np.clip(lz, 0, None).sum(),
                               atol=1e-12)


def test_semantic_metrics_equal_method_report(world):
    x, y, z, _ = world
    ref = method_report(image=x, text=y, substitute=z, k=10, seed=5, n_pairs=7000)
    got = semantic_metrics(y, z, k=10, seed=5, n_pairs=7000)
    for key in ("Phi", "Psi", "Omega_k"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key


def test_paired_metrics_apply_the_aligner_then_method_report(world):
    x, y, _, aligner = world
    got = paired_metrics(x, y, aligner, k=10, seed=2, n_pairs=3000)
    ref = method_report(image=aligner.transform_image(x), text=y, substitute=aligner.transform(y), k=10, seed=2,
                        n_pairs=3000, normalize=True)
    for key in SCALARS:
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    np.testing.assert_allclose(got["residual_spectrum"], ref["residual_spectrum"])
    np.testing.assert_allclose(got["residual_energy_curve"], np.cumsum(ref["residual_spectrum"]), atol=1e-12)
    raw = paired_metrics(x, y, None, k=10, seed=2, n_pairs=3000)
    assert raw["Phi"] == pytest.approx(1.0) and raw["delta_mu"] == pytest.approx(0.4, abs=0.05)
    assert got["delta_mu"] < raw["delta_mu"] / 4  # the aligner closes most of the centroid gap


def test_js_divergence_matches_scipy_and_bounds(rng):
    p = rng.random(50)
    q = rng.random(50)
    p, q = p / p.sum(), q / q.sum()
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-10)
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p), rel=1e-12)
    disjoint_a, disjoint_b = np.r_[np.ones(5), np.zeros(5)] / 5, np.r_[np.zeros(5), np.ones(5)] / 5
    assert js_divergence(disjoint_a, disjoint_b) == pytest.approx(np.log(2))


def test_cosine_density_is_a_kernel_density_estimate(rng):
    c = np.clip(rng.normal(0.2, 0.1, 20000), -1, 1)
    dens = cosine_density(c, bins=400)
    assert dens.sum() == pytest.approx(1.0)
    centres = np.linspace(-1, 1, 401)[:-1] + 1 / 400
    assert centres[np.argmax(dens)] == pytest.approx(0.2, abs=0.02)
    mean = np.sum(centres * dens)
    std = np.sqrt(np.sum((centres - mean) ** 2 * dens))
    assert mean == pytest.approx(0.2, abs=0.005)
    assert std == pytest.approx(np.sqrt(0.1**2 + (0.1 * 20000 ** -0.2) ** 2), rel=0.03)  # data + kernel variance


def test_cosine_js_separates_distributions(world):
    x, y, z, _ = world
    same = cosine_js(pairwise_cosines(x, n_pairs=20000, seed=0), pairwise_cosines(x, n_pairs=20000, seed=1))
    rng = np.random.default_rng(0)
    iso = rng.standard_normal(x.shape)
    iso /= np.linalg.norm(iso, axis=1, keepdims=True)
    far = cosine_js(pairwise_cosines(x, n_pairs=20000), pairwise_cosines(iso, n_pairs=20000))
    assert same < 0.002 < 0.02 < far < np.log(2)


def test_norm_stats_report_stored_norms():
    rows = np.array([[3.0, 4.0], [0.6, 0.8], [0.0, 1.001]])
    got = norm_stats(rows)
    assert got["norm_max"] == pytest.approx(5.0) and got["norm_min"] == pytest.approx(1.0)
    assert got["norm_max_dev"] == pytest.approx(4.0)
    assert got["norm_mean"] == pytest.approx((5 + 1 + 1.001) / 3)


def test_sampled_queries_match_the_geometry_functions(world):
    from anisogen.audit.metrics import mixing_query_rows, semantic_query_rows

    x, y, z, _ = world
    rows = mixing_query_rows(len(x), len(z), 150, seed=4)
    assert len(rows) == 300 and rows[:150].max() < len(x) <= rows[150:].min()
    graph = knn_graph(np.vstack([x, z]), k=10, kind="flat", device="cpu", query_rows=rows).neighbours
    got = unpaired_metrics(x, z, k=10, seed=4, neighbours=graph, query_rows=rows, n_pairs=3000)
    ref = knn_mixing(x, z, k=10, seed=4, neighbours=graph, query_rows=rows)
    for key, value in ref.items():
        assert got[key] == value, key
    full = unpaired_metrics(x, z, k=10, seed=4, n_pairs=3000)
    assert got["M_k_Z"] == pytest.approx(full["M_k_Z"], abs=0.1)  # a sample estimate of the same mean
    sem_rows = semantic_query_rows(len(z), 200, seed=4)
    sem = semantic_metrics(y, z, k=10, seed=4, n_pairs=3000, query_rows=sem_rows)
    rep = method_report(image=x, text=y, substitute=z, k=10, seed=4, n_pairs=3000, max_queries=200)
    assert sem["Omega_k"] == pytest.approx(rep["Omega_k"], rel=1e-12)
    raw = paired_metrics(x, y, None, k=10, seed=4, n_pairs=3000, max_queries=200)
    assert raw["Omega_k"] == 1.0  # texts against themselves, on the sampled rows
