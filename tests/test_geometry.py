"""Every diagnostic against an independent computation or a planted truth."""

import numpy as np
import pytest
import torch

from anisogen.geometry import (
    binary_entropy, gap_report, knn_mixing, knn_search, method_report, neighbour_overlap,
)
from anisogen.synthetic import make_paired_embeddings
from conftest import unit_rows


@pytest.fixture(scope="module")
def planted():
    return make_paired_embeddings(8000, 48, gap=0.45, residual_rank=3, residual_strength=1.5, seed=3)


# ---------------------------------------------------------------------------------------- §3
def test_gap_report_equals_direct_formulas(rng):
    x = unit_rows(rng, 600, 10, shift=np.linspace(0, 1, 10))
    y = unit_rows(rng, 600, 10, shift=-np.linspace(0, 1, 10))
    rep = gap_report(image=x, text=y, q=3)
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x.T, bias=True), np.cov(y.T, bias=True)
    lx, vx = np.linalg.eigh(cx)
    ly, vy = np.linalg.eigh(cy)
    assert rep["C_lambda"] == pytest.approx(np.corrcoef(np.log(lx[::-1]), np.log(ly[::-1]))[0, 1], abs=1e-10)
    assert rep["O_q"] == pytest.approx(np.linalg.norm(vx[:, -3:].T @ vy[:, -3:]) ** 2 / 3, abs=1e-10)
    assert rep["G_mu"] == pytest.approx(np.linalg.norm(mx - my), abs=1e-12)
    assert rep["G_Sigma"] == pytest.approx(np.linalg.norm(cx - cy) / np.linalg.norm(cx), rel=1e-9)
    r = x - (y - my + mx)
    assert rep["D_center"] == pytest.approx(np.linalg.norm(r, axis=1).mean(), rel=1e-12)
    assert rep["R_res"] == pytest.approx(
        np.linalg.norm(r, axis=1).mean() / np.linalg.norm(x - y, axis=1).mean(), rel=1e-12
    )
    sr = r.T @ r / len(r)
    lr = np.linalg.eigvalsh(sr)
    assert rep["A_r"] == pytest.approx(lr.max() / (lr.sum() / 10), rel=1e-9)
    assert rep["d_eff"] == pytest.approx(lr.sum() ** 2 / (lr**2).sum(), rel=1e-9)
    np.testing.assert_allclose(rep["energy_curve"], np.cumsum(lr[::-1]) / lr.sum(), atol=1e-10)
    basis = np.linalg.qr(rng.standard_normal((10, 4)))[0]
    rep_u = gap_report(image=x, text=y, q=3, subspace=basis)
    assert rep_u["eta_U"] == pytest.approx(np.trace(basis.T @ sr @ basis) / np.trace(sr), rel=1e-9)


def test_planted_gap_and_rank_k_residual(planted):
    rep = gap_report(image=planted.image, text=planted.text, q=8, subspace=planted.truth["residual_basis"])
    assert rep["G_mu"] == pytest.approx(0.45, abs=1e-12)  # antithetic samples: exact planted gap
    assert rep["A_r"] > 48 / 3 * 0.5  # most residual energy in 3 of 48 directions
    assert rep["eta_U"] > 0.6  # ... and those are the planted directions
    assert rep["d_eff_ratio"] < 0.25


def test_isotropic_residual_gives_unit_anisotropy():
    iso = make_paired_embeddings(20000, 32, residual_rank=0, content_decay=0.0, content_rank=30, seed=5)
    rep = gap_report(image=iso.image, text=iso.text)
    # the residual is isotropic over the d-2 non-anchor directions: A_r -> d/(d-2), d_eff -> d-2
    assert 1.0 <= rep["A_r"] < 1.25
    assert rep["d_eff_ratio"] > 0.9


def test_overlap_of_independent_random_subspaces_is_q_over_d(rng):
    d, q = 64, 8
    values = []
    for seed in range(10):
        r = np.random.default_rng(seed)
        basis_x = np.linalg.qr(r.standard_normal((d, d)))[0]
        basis_y = np.linalg.qr(r.standard_normal((d, d)))[0]
        scales = np.r_[np.full(q, 3.0), np.full(d - q, 0.3)]
        x = (r.standard_normal((4000, d)) * scales) @ basis_x.T
        y = (r.standard_normal((4000, d)) * scales) @ basis_y.T
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        values.append(gap_report(image=x, text=y, q=q)["O_q"])
    assert np.mean(values) == pytest.approx(q / d, abs=0.03)


# ---------------------------------------------------------------------------------------- kNN
def test_faiss_neighbours_equal_brute_force_torch(rng):
    x = unit_rows(rng, 300, 16)
    got = knn_search(x, k=5)
    sims = torch.from_numpy(x @ x.T)
    sims.fill_diagonal_(-np.inf)
    expected = torch.topk(sims, 5, dim=1).indices.numpy()
    assert (np.sort(got, 1) == np.sort(expected, 1)).mean() > 0.999  # float32 vs float64 near-ties
    q = unit_rows(rng, 20, 16)
    got_q = knn_search(x, q, k=3)
    np.testing.assert_array_equal(np.sort(got_q, 1), np.sort(np.argsort(-(q @ x.T), 1)[:, :3], 1))


def test_knn_excludes_self_even_with_duplicates():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    nn = knn_search(x, k=2)
    assert all(i not in row for i, row in enumerate(nn))
    with pytest.raises(ValueError, match="k=4 needs 1 <= k <= 3"):
        knn_search(x, k=4)


# ---------------------------------------------------------------------------------------- §5
def test_method_report_against_direct_computation(rng):
    n, d, k = 400, 12, 5
    x = unit_rows(rng, n, d, shift=np.ones(d) * 0.3)
    y = unit_rows(rng, n, d)
    z = y + 0.3 * rng.standard_normal((n, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    rep = method_report(image=x, text=y, substitute=z, k=k, seed=0, n_pairs=5000)
    assert rep["Phi"] == pytest.approx(np.mean(np.sum(y * z, 1)), abs=1e-12)
    r = np.random.default_rng(0)
    i = r.integers(0, n, 5000)
    j = (i + r.integers(1, n, 5000)) % n
    assert rep["Psi"] == pytest.approx(np.corrcoef(np.sum(y[i] * y[j], 1), np.sum(z[i] * z[j], 1))[0, 1], abs=1e-12)
    sy, sz = y @ y.T, z @ z.T
    np.fill_diagonal(sy, -np.inf)
    np.fill_diagonal(sz, -np.inf)
    ny, nz = np.argsort(-sy, 1)[:, :k], np.argsort(-sz, 1)[:, :k]
    omega = np.mean([len(set(a) & set(b)) / k for a, b in zip(ny, nz)])
    assert rep["Omega_k"] == pytest.approx(omega, abs=2e-3)
    assert rep["delta_mu"] == pytest.approx(np.linalg.norm(z.mean(0) - x.mean(0)), abs=1e-12)
    res = x - z
    lam = np.linalg.eigvalsh(res.T @ res / n)
    assert rep["A_r_T"] == pytest.approx(lam.max() / (lam.sum() / d), rel=1e-9)
    np.testing.assert_allclose(rep["residual_spectrum"], lam[::-1] / lam.sum(), atol=1e-10)


def test_mixing_is_zero_when_separated_and_one_when_identically_distributed(rng):
    x = unit_rows(rng, 500, 8, shift=np.r_[20.0, np.zeros(7)])
    far = unit_rows(rng, 500, 8, shift=np.r_[-20.0, np.zeros(7)])
    same = unit_rows(rng, 500, 8, shift=np.r_[20.0, np.zeros(7)])
    sep = knn_mixing(x, far, k=10, seed=0)
    mixed = knn_mixing(x, same, k=10, seed=0)
    assert sep["M_k_Z"] == 0.0 and sep["M_k_X"] == 0.0 and sep["nn_is_image_frac_Z"] == 0.0
    assert mixed["M_k_Z"] == pytest.approx(1.0, abs=0.05) and mixed["M_k_X"] == pytest.approx(1.0, abs=0.05)
    # the permutation normaliser is close to the balanced binomial closed form E[H2(Binom(k, 1/2)/k)]
    from scipy.stats import binom

    closed = sum(binom.pmf(j, 10, 0.5) * binary_entropy(np.array([j / 10]))[0] for j in range(11))
    assert mixed["M_k_expected_Z"] == pytest.approx(closed, abs=0.01)


def test_neighbour_overlap_counts_intersections():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[3, 2, 9], [7, 8, 0]])
    np.testing.assert_allclose(neighbour_overlap(a, b), [2 / 3, 0.0])


def test_bad_inputs_are_named(rng):
    x = unit_rows(rng, 30, 6)
    with pytest.raises(ValueError, match="dimension mismatch between inputs: image d=6, text d=5"):
        gap_report(image=x, text=unit_rows(rng, 30, 5))
    with pytest.raises(ValueError, match="same number of rows: image N=30, text N=20, substitute N=30"):
        method_report(image=x, text=x[:20], substitute=x)
    with pytest.raises(ValueError, match="needs at least k\\+1=21 rows for k=20, got 20"):
        method_report(image=x[:20], text=x[:20], substitute=x[:20])
    bad = x.copy()
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match="substitute: row 4 contains NaN or Inf"):
        method_report(image=x, text=x, substitute=bad, k=3)
    with pytest.raises(ValueError, match="text: row 0 has L2 norm"):
        gap_report(image=x, text=2 * x)
    assert gap_report(image=x, text=2 * x, normalize=True)["G_mu"] == pytest.approx(0.0, abs=1e-12)


def test_query_sampling_scores_the_same_neighbourhoods_on_fewer_rows(rng):
    from anisogen.geometry.method import sample_rows

    n, d, k = 500, 8, 6
    x = unit_rows(rng, n, d, shift=np.ones(d) * 0.5)
    y = unit_rows(rng, n, d)
    z = unit_rows(rng, n, d, shift=np.ones(d) * 0.2)
    full = method_report(image=x, text=y, substitute=z, k=k, seed=3)
    assert method_report(image=x, text=y, substitute=z, k=k, seed=3, max_queries=n)["Omega_k"] == full["Omega_k"]
    part = method_report(image=x, text=y, substitute=z, k=k, seed=3, max_queries=120)
    rows = sample_rows(n, 120, np.random.default_rng([3, 1]))
    per_row = neighbour_overlap(knn_search(y, k=k), knn_search(z, k=k))
    assert part["Omega_k"] == pytest.approx(per_row[rows].mean(), abs=1e-12)
    assert part["Phi"] == full["Phi"] and part["A_r_T"] == full["A_r_T"]
    assert part["M_k_Z"] == pytest.approx(full["M_k_Z"], abs=0.1)
