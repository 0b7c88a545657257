"""Issue-12 fixes of AnisoAlign's losses and Stage II-a: SDS sign, L_Phi scale, L_G, shrinkage, D_V floor, bounds."""

import math

import numpy as np
import pytest
import torch

from anisogen.align.aniso.frame import Frame
from anisogen.align.aniso.init import GlobalInit, RadialMap, side_scales, v_side_scaling
from anisogen.align.aniso.polar import from_polar, to_polar, wrap
from anisogen.align.aniso.prior import PhasePrior, dsm_loss, guidance_loss
from anisogen.align.aniso.refine import kappa_bounds, phase_deformation_loss
from anisogen.embeddings import l2_normalize
from anisogen.stats import Moments

M = 3
MODE = torch.tensor([0.7, -2.0, 2.9], dtype=torch.float64)
PRIOR_VAR = 0.05  # the clean prior: a wrapped Gaussian of variance 0.05 around MODE in every block


class KnownScore(torch.nn.Module):
    """A score network with the closed-form score of the noised prior, N(MODE, PRIOR_VAR + 2 sigma^2) on the circle.

    forward returns eps_hat = -sqrt(2) sigma s(phi) (the ScoreNet parameterisation)."""

    def score(self, phi, sigma, log_rho):
        return -wrap(phi - MODE) / (PRIOR_VAR + 2.0 * sigma**2)

    def forward(self, phi, sigma, log_rho):
        return -math.sqrt(2.0) * sigma * self.score(phi, sigma, log_rho)


def flat_prior() -> "torch.nn.Module":
    """No drift: zero weights and no edges, so mu_phi = phi."""
    prior = PhasePrior(np.zeros(M), np.zeros(M), np.zeros((M, M)), np.zeros((M, M)), np.zeros((0, 2), dtype=np.int64))
    return prior.to_torch(dtype=torch.float64)


def descent_step(loss_fn, phi0: torch.Tensor, lr: float = 0.05, draws: int = 4096, seed: int = 0) -> torch.Tensor:
    """One gradient-descent step on the mean loss over many (t, eps) draws of the same phases."""
    g = torch.Generator().manual_seed(seed)
    phi = phi0.repeat(draws, 1).clone().requires_grad_(True)
    t = torch.rand(draws, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(draws, M, generator=g, dtype=torch.float64)
    loss_fn(phi, t, noise).mean().backward()
    return (phi0 - lr * phi.grad.sum(0)).detach()


@pytest.mark.parametrize("gradient", ["sds", "full"])
def test_prior_matching_descent_moves_the_phase_towards_the_prior_mode(gradient):
    phi0 = (MODE + torch.tensor([0.6, -0.5, 0.4], dtype=torch.float64)).unsqueeze(0)
    net, prior = KnownScore(), flat_prior()

    def loss(phi, t, noise):
        return dsm_loss(net, phi, torch.zeros_like(phi), prior, t=t, noise=noise, tau=0.0, sigma_min=0.01,
                        sigma_max=1.0, gradient=gradient)

    before = wrap(phi0 - MODE).abs()
    after = wrap(descent_step(loss, phi0) - MODE).abs()
    assert torch.all(after < before), (before, after)


def test_sds_value_equals_the_full_loss_value():
    g = torch.Generator().manual_seed(1)
    phi = torch.rand(64, M, generator=g, dtype=torch.float64) * 6 - 3
    t, noise = torch.rand(64, 1, generator=g, dtype=torch.float64), torch.randn(64, M, generator=g, dtype=torch.float64)
    kw = dict(t=t, noise=noise, tau=0.0, sigma_min=0.01, sigma_max=1.0)
    full = dsm_loss(KnownScore(), phi, torch.zeros_like(phi), flat_prior(), gradient="full", **kw)
    sds = dsm_loss(KnownScore(), phi, torch.zeros_like(phi), flat_prior(), gradient="sds", **kw)
    torch.testing.assert_close(sds, full, rtol=0, atol=1e-12)


def test_guidance_loss_pulls_towards_the_one_step_denoised_mode():
    phi0 = (MODE + torch.tensor([0.6, -0.5, 0.4], dtype=torch.float64)).unsqueeze(0)

    def loss(phi, t, noise):
        return guidance_loss(KnownScore(), phi, torch.zeros_like(phi), flat_prior(), t=t, noise=noise, tau=0.0,
                             sigma_min=0.01, sigma_max=1.0)

    after = wrap(descent_step(loss, phi0, lr=0.01) - MODE).abs()
    assert torch.all(after < wrap(phi0 - MODE).abs())
    # with noise-free draws (sigma_min = sigma_max -> 0) the target is phi itself: zero loss, zero gradient
    phi = phi0.clone().requires_grad_(True)
    value = guidance_loss(KnownScore(), phi, torch.zeros_like(phi), flat_prior(),
                          t=torch.zeros(1, 1, dtype=torch.float64),
                          noise=torch.zeros(1, M, dtype=torch.float64), tau=0.0, sigma_min=1e-9, sigma_max=1e-9)
    value.sum().backward()
    assert float(value.detach()) < 1e-12 and float(phi.grad.abs().max()) < 1e-6


def test_phase_loss_sum_normalisation_is_edges_squared_times_the_paper_and_pulls_back():
    g = torch.Generator().manual_seed(2)
    edges = torch.tensor([[0, 1], [0, 2], [1, 2]])
    rho0 = torch.rand(8, M, generator=g, dtype=torch.float64) + 0.5
    delta = (torch.rand(8, M, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    paper = phase_deformation_loss(delta, rho0, edges, 1e-8, "paper")
    total = phase_deformation_loss(delta, rho0, edges, 1e-8, "sum")
    torch.testing.assert_close(total, paper * 9, rtol=1e-12, atol=0)
    assert float(paper.max()) <= 2.0 / 3 + 1e-12  # the paper's bound 2/|E|
    total.sum().backward()
    grad = delta.grad
    assert float(grad.abs().max()) > 1e-3  # non-zero at a non-zero refinement
    # a descent step shrinks every pairwise phase difference of the increments (pulls them back together)
    stepped = (delta - 0.05 * grad).detach()
    for i, j in edges.tolist():
        assert torch.all((stepped[:, i] - stepped[:, j]).abs() <= (delta[:, i] - delta[:, j]).abs().detach() + 1e-15)
    with pytest.raises(ValueError, match="normalization must be one of"):
        phase_deformation_loss(delta, rho0, edges, 1e-8, "mean")


def test_kappa_bounds_solve_for_the_target_kappa_on_the_ray():
    b = kappa_bounds(0.05, rho_ratio=0.5)
    assert b.kappa == pytest.approx(0.05, abs=1e-12) and b.alpha_rho == pytest.approx(0.5 * b.alpha_theta)
    assert kappa_bounds(0.0).alpha_theta == 0.0
    assert kappa_bounds(100.0).alpha_theta == pytest.approx(math.pi)  # capped at pi


# ------------------------------------------------------------------------------------- Stage II-a
@pytest.fixture(scope="module")
def moments_and_frame():
    rng = np.random.default_rng(5)
    d, r = 10, 4
    text = l2_normalize(rng.standard_normal((3000, d)) * np.linspace(2.0, 0.2, d) + 1.5)
    image = l2_normalize(rng.standard_normal((3000, d)) * np.linspace(0.5, 1.5, d) - 0.7)
    tm, im = Moments.from_source(text, name="text"), Moments.from_source(image, name="image")
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    mixing, _ = np.linalg.qr(rng.standard_normal((r, r)))
    frame = Frame(eigenvalues=np.arange(d, 0, -1.0), q_u=q[:, :r], q_v=q[:, r:], mixing=mixing)
    basis = frame.basis
    rho_y, _ = to_polar((text - tm.mean + im.mean) @ basis, 1e-8)
    rho_x, _ = to_polar(image @ basis, 1e-8)
    levels = np.linspace(0, 1, 64)
    radial = RadialMap(levels, np.quantile(rho_y, levels, axis=0).T, np.quantile(rho_x, levels, axis=0).T)
    return text, image, tm, im, frame, radial


def _init(tm, im, frame, radial, gamma, gamma_v=None, floor=0.0, mode="common"):
    d_v = v_side_scaling(tm, im, frame.q_v, 1e-8, floor)
    su, sv = side_scales(tm, im, frame.basis, frame.q_v, 1e-8, mode)
    return GlobalInit(tm.mean, im.mean, frame, radial, d_v, 1e-8, gamma, su, sv, gamma_v)


def test_shrinkage_one_is_the_paper_map_bit_for_bit(moments_and_frame):
    text, _, tm, im, frame, radial = moments_and_frame
    paper = GlobalInit(tm.mean, im.mean, frame, radial, v_side_scaling(tm, im, frame.q_v, 1e-8), 1e-8)
    shrunk = _init(tm, im, frame, radial, 1.0)
    for a, b in zip(paper.state(text), shrunk.state(text)):
        np.testing.assert_array_equal(a, b)
    # independent computation of the paper's state
    theta, rho = to_polar((text - tm.mean + im.mean) @ frame.basis, 1e-8)[::-1]
    np.testing.assert_array_equal(paper.state(text)[0], theta)
    np.testing.assert_array_equal(paper.state(text)[1], radial(rho))


def test_shrinkage_zero_is_the_global_realign_map(moments_and_frame):
    text, _, tm, im, frame, radial = moments_and_frame
    init = _init(tm, im, frame, radial, 0.0)
    theta0, rho0, v0 = init.state(text)
    mapped = from_polar(rho0, theta0, 1e-8) @ frame.basis.T + v0
    s = np.sqrt(np.trace(im.covariance) / (np.trace(tm.covariance) + 1e-8))  # the trace rule, with its eps
    np.testing.assert_allclose(mapped, im.mean + s * (text - tm.mean), atol=1e-13)  # ReAlign's pre-normalisation map
    # per-side scales: s_U on U, s_V on V, each ReAlign's trace rule on its side
    side = _init(tm, im, frame, radial, 0.0, mode="per_side")
    theta0, rho0, v0 = side.state(text)
    mapped = from_polar(rho0, theta0, 1e-8) @ frame.basis.T + v0
    p_u = frame.basis @ frame.basis.T
    s_u = np.sqrt(np.trace(p_u @ im.covariance) / (np.trace(p_u @ tm.covariance) + 1e-8))
    s_v = np.sqrt(np.trace((np.eye(10) - p_u) @ im.covariance) / (np.trace((np.eye(10) - p_u) @ tm.covariance) + 1e-8))
    expected = im.mean + (text - tm.mean) @ (s_u * p_u + s_v * (np.eye(10) - p_u))
    np.testing.assert_allclose(mapped, expected, atol=1e-13)


def test_intermediate_shrinkage_is_the_convex_combination_per_side(moments_and_frame):
    text, _, tm, im, frame, radial = moments_and_frame

    def mapped(init):
        theta0, rho0, v0 = init.state(text)
        return from_polar(rho0, theta0, 1e-8) @ frame.basis.T, v0

    (u1, v1), (u0, v0) = mapped(_init(tm, im, frame, radial, 1.0)), mapped(_init(tm, im, frame, radial, 0.0))
    u, v = mapped(_init(tm, im, frame, radial, 0.3, 0.8))
    np.testing.assert_allclose(u, 0.3 * u1 + 0.7 * u0, atol=1e-13)
    np.testing.assert_allclose(v, 0.8 * v1 + 0.2 * v0, atol=1e-13)
    with pytest.raises(ValueError, match=r"shrinkage gamma must be in \[0, 1\]"):
        _init(tm, im, frame, radial, 1.5)


def test_variance_floor_caps_the_std_ratio(moments_and_frame):
    _, _, tm, im, frame, _ = moments_and_frame
    var_y = np.sum(frame.q_v * (tm.covariance @ frame.q_v), axis=0)
    var_x = np.sum(frame.q_v * (im.covariance @ frame.q_v), axis=0)
    floored = v_side_scaling(tm, im, frame.q_v, 1e-8, floor=0.5)
    expected = np.sqrt(var_x) / (np.sqrt(np.maximum(var_y, 0.5 * var_y.mean())) + 1e-8)
    np.testing.assert_allclose(floored, expected, rtol=1e-12)
    assert np.all(floored <= v_side_scaling(tm, im, frame.q_v, 1e-8) + 1e-15)
    with pytest.raises(ValueError, match="floor must be >= 0"):
        v_side_scaling(tm, im, frame.q_v, 1e-8, floor=-1.0)
