"""AnisoAlign building blocks checked against independent computations (spec §2.2-§2.8)."""

import numpy as np
import pytest
import torch

from anisogen.align.aniso.frame import choose_rank, eigen_frame, haar_orthogonal, learn_mixing, phase_stability
from anisogen.align.aniso.init import fit_radial_map, v_side_scaling
from anisogen.align.aniso.polar import from_polar, to_polar, wrap
from anisogen.align.aniso.prior import (
    PhasePrior, phase_statistics, potential, potential_grad, select_edges, sigma_schedule, wrapped_gaussian_logpdf,
    wrapped_gaussian_score,
)
from anisogen.align.aniso.refine import Bounds, bounded_update, phase_deformation_loss
from anisogen.align.aniso.training import LoopConfig, reservoir_sample
from anisogen.stats import Moments
from conftest import unit_rows


def random_prior(rng, m=6, p=2):
    strength = rng.uniform(0.1, 1.0, (m, m))
    strength = (strength + strength.T) / 2
    np.fill_diagonal(strength, 0.0)
    offset = rng.uniform(-np.pi, np.pi, (m, m))
    offset = (offset - offset.T) / 2
    return PhasePrior(rng.uniform(-np.pi, np.pi, m), rng.dirichlet(np.ones(m)), strength, offset,
                      select_edges(strength, p))


# ------------------------------------------------------------------------------------ polar
def test_wrap_lands_in_half_open_interval_and_is_2pi_periodic(rng):
    x = rng.uniform(-50, 50, 10000)
    w = wrap(x)
    assert w.min() >= -np.pi and w.max() < np.pi
    np.testing.assert_allclose(np.cos(w), np.cos(x), atol=1e-12)
    np.testing.assert_allclose(np.sin(w), np.sin(x), atol=1e-12)
    inside = rng.uniform(-3.0, 3.0, 100)
    np.testing.assert_allclose(wrap(inside), inside, atol=1e-15)
    assert wrap(np.pi) == pytest.approx(-np.pi)
    torch.testing.assert_close(wrap(torch.tensor(x)), torch.tensor(w), atol=1e-12, rtol=0)


def test_polar_round_trip_is_exact_numpy_and_torch(rng):
    c = rng.standard_normal((500, 16)) * rng.uniform(1e-3, 3.0, 16)
    eps = 1e-8
    rho, theta = to_polar(c, eps)
    assert rho.shape == theta.shape == (500, 8)
    np.testing.assert_allclose(rho**2, c[:, 0::2] ** 2 + c[:, 1::2] ** 2 + eps, rtol=1e-14)
    np.testing.assert_allclose(np.tan(theta), c[:, 1::2] / c[:, 0::2], rtol=1e-9)
    np.testing.assert_allclose(from_polar(rho, theta, eps), c, rtol=0, atol=1e-14)
    rho_t, theta_t = to_polar(torch.tensor(c), eps)
    torch.testing.assert_close(from_polar(rho_t, theta_t, eps), torch.tensor(c), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="even number of coordinates"):
        to_polar(c[:, :3], eps)


# ------------------------------------------------------------------------------------ frame
def test_choose_rank_given_energy_and_default():
    lam = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125])  # total 16
    assert choose_rank(lam, rank=4) == 4
    assert choose_rank(lam, energy=0.5) == 2  # 8/16 reached by r = 1 -> rounded up to even
    assert choose_rank(lam, energy=0.9) == 4  # cumulative 0.5, 0.75, 0.875, 0.9375
    assert choose_rank(lam, energy=0.95) == 6
    assert choose_rank(np.ones(1280)) == 128 and choose_rank(np.ones(512)) == 52 and choose_rank(np.ones(8)) == 2
    with pytest.raises(ValueError, match="even number"):
        choose_rank(lam, rank=3)
    with pytest.raises(ValueError, match="energy threshold"):
        choose_rank(lam, energy=1.5)


def test_haar_mixing_is_orthogonal_and_seeded():
    r = haar_orthogonal(12, seed=3)
    np.testing.assert_allclose(r.T @ r, np.eye(12), atol=1e-13)
    np.testing.assert_array_equal(r, haar_orthogonal(12, seed=3))
    assert not np.allclose(r, haar_orthogonal(12, seed=4))


def test_frame_eigenvectors_signs_and_complement(rng):
    d = 10
    text = unit_rows(rng, 3000, d, shift=rng.standard_normal(d))
    image = unit_rows(rng, 3000, d, shift=2 * rng.standard_normal(d))
    tm, im = Moments(d).update(text), Moments(d).update(image)
    frame = eigen_frame(tm, im, ridge=1e-6, rank=4, energy=None)
    sigma = np.cov(text.T, bias=True) + np.cov(image.T, bias=True) + 1e-6 * np.eye(d)
    lam = np.linalg.eigvalsh(sigma)[::-1]
    np.testing.assert_allclose(frame.eigenvalues, lam, rtol=1e-10)
    np.testing.assert_allclose(sigma @ frame.q_u, frame.q_u * lam[:4], atol=1e-12)
    full = np.hstack([frame.q_u, frame.q_v])
    np.testing.assert_allclose(full.T @ full, np.eye(d), atol=1e-12)
    cols = np.arange(d)
    assert np.all(full[np.abs(full).argmax(axis=0), cols] > 0)  # deterministic sign convention
    frame.mixing = haar_orthogonal(4, 0)
    np.testing.assert_allclose(frame.basis @ frame.basis.T, frame.q_u @ frame.q_u.T, atol=1e-12)  # same U


def test_learned_mixing_increases_phase_stability_and_stays_orthogonal():
    g = np.random.default_rng(5)
    n, r = 4000, 6
    # three planar blocks with concentrated phases, then scrambled by a random rotation of U
    theta = g.vonmises([0.5, -1.0, 2.0], 2.0, (n, 3))
    rho = g.uniform(0.5, 1.5, (n, 3))
    clean = np.empty((n, r))
    clean[:, 0::2], clean[:, 1::2] = rho * np.cos(theta), rho * np.sin(theta)
    scrambled = clean @ haar_orthogonal(r, 11).T
    start = haar_orthogonal(r, 1)
    loop = LoopConfig(steps=150, batch_size=1024, lr=0.05, eval_every=50, log_every=50)
    learned, hist = learn_mixing(scrambled, start, loop=loop, eps=1e-8)
    np.testing.assert_allclose(learned.T @ learned, np.eye(r), atol=1e-10)
    s0 = float(phase_stability(torch.tensor(scrambled @ start), 1e-8))
    s1 = float(phase_stability(torch.tensor(scrambled @ learned), 1e-8))
    assert s1 > s0 + 0.5
    assert hist["mixing_stability_val"][-1] > hist["mixing_stability_val"][0]


def test_phase_stability_matches_complex_statistics():
    g = np.random.default_rng(2)
    c = g.standard_normal((300, 8)) + 0.3
    z = np.exp(1j * np.arctan2(c[:, 1::2], c[:, 0::2]))
    m = z.T @ np.conj(z) / len(z)
    expected = np.abs(z.mean(0)).sum() + np.abs(m[np.triu_indices(4, 1)]).sum()
    assert float(phase_stability(torch.tensor(c), 0.0)) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------- Stage I maths
def test_closed_form_drift_equals_autograd_of_the_potential(rng):
    prior = random_prior(rng, m=7, p=3)
    tp = prior.to_torch(dtype=torch.float64)
    phi = torch.tensor(rng.uniform(-4, 4, (64, 7)), requires_grad=True)
    (grad,) = torch.autograd.grad(potential(phi, tp).sum(), phi)
    torch.testing.assert_close(potential_grad(phi.detach(), tp), grad, rtol=0, atol=1e-13)
    # explicit formula of eq. 4, summed over neighbours with eta_lk = -eta_kl
    p0 = phi.detach().numpy()[0]
    expect = prior.weights * np.sin(p0 - prior.anchor)
    for k, j in prior.edges:
        expect[k] += prior.strength[k, j] * np.sin(p0[k] - p0[j] - prior.offset[k, j])
        expect[j] += prior.strength[j, k] * np.sin(p0[j] - p0[k] - prior.offset[j, k])
    np.testing.assert_allclose(potential_grad(phi.detach(), tp)[0].numpy(), expect, atol=1e-13)


def test_wrapped_gaussian_score_equals_finite_differences_of_log_q(rng):
    x = torch.tensor(rng.uniform(-np.pi, np.pi, 400), dtype=torch.float64)
    mu = torch.tensor(rng.uniform(-np.pi, np.pi, 400), dtype=torch.float64)
    for sigma in (0.05, 0.3, 1.0, 2.5):
        var = 2 * sigma**2
        h = 1e-6
        fd = (wrapped_gaussian_logpdf(x + h, mu, var) - wrapped_gaussian_logpdf(x - h, mu, var)) / (2 * h)
        torch.testing.assert_close(wrapped_gaussian_score(x, mu, var), fd, rtol=1e-6, atol=1e-5)
        # q is a density on the circle
        grid = torch.linspace(-np.pi, np.pi, 20001, dtype=torch.float64)
        dens = torch.exp(wrapped_gaussian_logpdf(grid, torch.tensor(0.7, dtype=torch.float64), var))
        assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    # narrow: the plain Gaussian score -(x - mu) / s^2
    d = torch.tensor([0.01, -0.02], dtype=torch.float64)
    torch.testing.assert_close(wrapped_gaussian_score(d, torch.zeros(2, dtype=torch.float64), 1e-3), -d / 1e-3)


def test_sigma_schedule_is_geometric():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_schedule(t, 0.01, 1.0), torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64))


def test_select_edges_is_the_union_of_per_block_top_p():
    a = np.array([[0, 9, 1, 2], [9, 0, 3, 4], [1, 3, 0, 8], [2, 4, 8, 0]], dtype=float)
    # top-1: 0->1, 1->0, 2->3, 3->2 ; top-2 adds 0->3, 1->3, 2->1, 3->1
    np.testing.assert_array_equal(select_edges(a, 1), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(select_edges(a, 2), [[0, 1], [0, 3], [1, 2], [1, 3], [2, 3]])
    assert select_edges(a, 10).shape == (6, 2)


def test_phase_statistics_recover_planted_anchors_and_couplings():
    g = np.random.default_rng(7)
    n = 20000
    anchors = np.array([1.0, -2.0, 0.3])
    base = g.vonmises(0.0, 1.0, n)
    theta = np.stack([wrap(base + anchors[0]), wrap(base + anchors[1] + g.vonmises(0, 8.0, n)),
                      g.uniform(-np.pi, np.pi, n)], axis=1)
    rho = np.stack([np.full(n, 2.0), np.full(n, 1.0), np.full(n, 1.0)], axis=1)
    prior = phase_statistics(rho, theta, partners=1, eps=1e-12)
    np.testing.assert_allclose(prior.anchor[:2], anchors[:2], atol=0.05)
    np.testing.assert_allclose(prior.weights, [4 / 6, 1 / 6, 1 / 6], atol=1e-9)
    assert prior.offset[0, 1] == pytest.approx(wrap(anchors[0] - anchors[1]), abs=0.05)
    np.testing.assert_allclose(prior.offset, -prior.offset.T, atol=1e-15)
    np.testing.assert_allclose(prior.strength, prior.strength.T, atol=1e-15)
    assert prior.strength[0, 1] > 0.9 and prior.strength[0, 2] < 0.05
    assert [0, 1] in prior.edges.tolist()


# ------------------------------------------------------------------------------ Stage II-a
def test_radial_quantile_matching_maps_text_quantiles_to_image_quantiles():
    g = np.random.default_rng(3)
    text = g.uniform(0.0, 1.0, (50000, 2))
    image = np.stack([g.exponential(2.0, 50000), g.uniform(5.0, 6.0, 50000)], axis=1)
    radial = fit_radial_map(text, image, knots=512)
    probe = np.array([[0.1, 0.5], [0.5, 0.9]])
    # independent: empirical F_y, then the empirical image quantile at that level
    expected = np.array(
        [[np.quantile(image[:, k], np.mean(text[:, k] <= r)) for k, r in enumerate(row)] for row in probe]
    )
    np.testing.assert_allclose(radial(probe), expected, rtol=5e-3)
    truth = np.stack([-2.0 * np.log(1 - probe[:, 0]), 5.0 + probe[:, 1]], axis=1)  # population F_x^{-1}(F_y(r))
    np.testing.assert_allclose(radial(probe), truth, rtol=0.06)
    assert np.all(np.diff(radial(np.linspace(-1, 2, 50)[:, None].repeat(2, 1)), axis=0) >= 0)  # monotone
    clamped = radial(np.array([[-5.0, 9.0]]))
    assert clamped[0, 0] == pytest.approx(image[:, 0].min()) and clamped[0, 1] == pytest.approx(image[:, 1].max())


def test_v_side_scaling_is_the_std_ratio_in_the_q_v_basis(rng):
    d = 8
    text = unit_rows(rng, 2000, d) * 1.0
    image = unit_rows(rng, 2000, d, shift=np.linspace(0, 2, d))
    q, _ = np.linalg.qr(rng.standard_normal((d, 5)))
    dv = v_side_scaling(Moments(d).update(text), Moments(d).update(image), q, eps=1e-8)
    np.testing.assert_allclose(dv, (image @ q).std(0) / ((text @ q).std(0) + 1e-8), rtol=1e-10)


# ------------------------------------------------------------------------------ Stage II-b
def test_bounded_update_respects_every_bound_even_for_huge_outputs(rng):
    n, m, d = 300, 4, 12
    basis = torch.tensor(np.linalg.qr(rng.standard_normal((d, 2 * m)))[0])
    theta0 = torch.tensor(rng.uniform(-np.pi, np.pi, (n, m)))
    rho0 = torch.tensor(rng.uniform(0.01, 2.0, (n, m)))
    v0 = torch.tensor(rng.standard_normal((n, d)))
    v0 = v0 - (v0 @ basis) @ basis.T
    bounds = Bounds(alpha_theta=0.2, alpha_rho=0.1, alpha_v=0.002)
    outs = [torch.tensor(rng.standard_normal(s) * 100) for s in ((n, m), (n, m), (n, d))]
    theta, rho, v, delta = bounded_update(theta0, rho0, v0, *outs, basis, bounds)
    assert float(wrap(theta - theta0).abs().max()) <= 0.2 + 1e-12
    ratio = rho / rho0
    assert float(ratio.min()) >= np.exp(-0.1) - 1e-12 and float(ratio.max()) <= np.exp(0.1) + 1e-12
    step = v - v0
    assert float(((step @ basis)).abs().max()) < 1e-15  # exactly in V
    assert float(step.norm(dim=1).max()) <= 0.002 * np.sqrt(d) + 1e-12
    np.testing.assert_allclose(delta.numpy(), 0.2 * np.tanh(outs[0].numpy()))
    # kappa of App. A.7.2: the per-block displacement bound
    c0 = from_polar(rho0, theta0, 0.0)
    c1 = from_polar(rho, theta, 0.0)
    disp = (c1 - c0).reshape(n, m, 2).norm(dim=-1)
    assert float((disp / rho0).max()) <= bounds.kappa + 1e-9
    assert bounds.kappa == pytest.approx(np.sqrt((np.e**0.1 - 1) ** 2 + 4 * np.e**0.1 * np.sin(0.1) ** 2))


def test_phase_deformation_loss_matches_the_definition(rng):
    n, m = 50, 5
    edges = torch.tensor([[0, 1], [1, 3], [2, 4]])
    theta0 = torch.tensor(rng.uniform(-np.pi, np.pi, (n, m)))
    rho0 = torch.tensor(rng.uniform(0.1, 2.0, (n, m)))
    delta = torch.tensor(rng.uniform(-0.2, 0.2, (n, m)))
    theta_hat = wrap(theta0 + delta)
    loss = phase_deformation_loss(delta, rho0, edges, eps=1e-8)
    w = torch.stack([rho0[:, k] * rho0[:, j] for k, j in edges.tolist()], 1)
    w = w / (w.sum(1, keepdim=True) + 1e-8)
    direct = torch.stack([1 - torch.cos((theta_hat[:, k] - theta_hat[:, j]) - (theta0[:, k] - theta0[:, j]))
                          for k, j in edges.tolist()], 1)
    torch.testing.assert_close(loss, (w * direct).sum(1) / 3, atol=1e-12, rtol=0)
    assert float(phase_deformation_loss(torch.zeros(n, m), rho0, edges, 1e-8).abs().max()) == 0.0
    shifted = phase_deformation_loss(delta + 0.37, rho0, edges, 1e-8)  # common rotation keeps relative phases
    torch.testing.assert_close(shifted, loss, atol=1e-12, rtol=0)


def test_reservoir_sample_is_uniform_deterministic_and_capped():
    data = np.arange(10000, dtype=float)[:, None]
    chunks = lambda: (data[s : s + 777] for s in range(0, 10000, 777))  # noqa: E731
    a = reservoir_sample(chunks(), 1000, seed=1)
    np.testing.assert_array_equal(a, reservoir_sample(chunks(), 1000, seed=1))
    assert a.shape == (1000, 1) and len(np.unique(a)) == 1000
    assert abs(a.mean() - 4999.5) < 300  # uniform over the whole stream, not the first rows
    assert reservoir_sample(chunks(), 20000, seed=1).shape == (10000, 1)
    np.testing.assert_array_equal(np.sort(reservoir_sample(chunks(), 20000, seed=1)[:, 0]), data[:, 0])
