"""Stage I and Stage II training loops lower their own objectives (spec eqs. 6, 8, 9)."""

import copy

import numpy as np
import pytest
import torch

from anisogen.align.aniso.polar import wrap
from anisogen.align.aniso.prior import DiffusionConfig, build_score_net, dsm_loss, phase_statistics, train_score_net
from anisogen.align.aniso.refine import Bounds, Stage2Objective, build_refiner, stage2_terms, train_refiner
from anisogen.align.aniso.training import LoopConfig

M = 3
DIFF = DiffusionConfig(tau=0.1, sigma_min=0.01, sigma_max=1.0, n_terms=3)


def image_phases(n, seed):
    """Anchored, coupled phases: a shared von Mises factor plus per-block offsets and jitter."""
    g = np.random.default_rng(seed)
    base = g.vonmises(0.0, 3.0, n)
    theta = wrap(np.stack([base + 0.8, base - 1.5 + g.vonmises(0, 6.0, n), g.vonmises(2.5, 4.0, n)], axis=1))
    rho = g.uniform(0.5, 1.5, (n, M))
    return theta, rho


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    theta, rho = image_phases(6000, 1)
    prior = phase_statistics(rho, theta, partners=2, eps=1e-8)
    net = build_score_net(M, hidden=64, layers=2, fourier=4, sigma_min=0.01, sigma_max=1.0, seed=3)
    initial = copy.deepcopy(net)
    loop = LoopConfig(steps=400, batch_size=256, lr=3e-3, seed=0, eval_every=100, log_every=50, val_size=1024)
    history = train_score_net(net, theta, rho, prior, diffusion=DIFF, loop=loop)
    return prior, initial, net, history


def fixed_eval(prior, n=4000, seed=9):
    theta, rho = image_phases(n, seed)
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor(theta, dtype=torch.float32), torch.log(torch.tensor(rho, dtype=torch.float32)),
            torch.rand(n, 1, generator=g), torch.randn(n, M, generator=g))


def test_stage1_lowers_L_I_on_fresh_images(stage1):
    prior, initial, trained, history = stage1
    phi, log_rho, t, noise = fixed_eval(prior)
    tp = prior.to_torch()
    kw = dict(t=t, noise=noise, tau=DIFF.tau, sigma_min=DIFF.sigma_min, sigma_max=DIFF.sigma_max)
    with torch.no_grad():
        before = float(dsm_loss(initial, phi, log_rho, tp, **kw).mean())
        after = float(dsm_loss(trained, phi, log_rho, tp, **kw).mean())
    # a score that ignores the prior (eps_hat = 0) scores E||sqrt(2) sigma grad log q||^2 ~ m = 3
    with torch.no_grad():
        zero = float(dsm_loss(lambda *a: torch.zeros_like(phi), phi, log_rho, tp, **kw).mean())
    assert after < 0.8 * before and after < 0.8 * zero
    curve = history["stage1_L_I_val"]
    assert history["stage1_L_I_val_step"] == [0.0, 100.0, 200.0, 300.0, 400.0]
    assert curve[-1] < 0.8 * curve[0]
    assert len(history["stage1_L_I"]) == 8  # window means every 50 steps
    assert not any(p.requires_grad for p in trained.parameters())


def test_stage1_training_is_seeded(stage1):
    prior, _, trained, _ = stage1
    theta, rho = image_phases(6000, 1)
    again = build_score_net(M, hidden=64, layers=2, fourier=4, sigma_min=0.01, sigma_max=1.0, seed=3)
    train_score_net(again, theta, rho, prior, diffusion=DIFF,
                    loop=LoopConfig(steps=400, batch_size=256, lr=3e-3, seed=0, eval_every=100, log_every=50,
                                    val_size=1024))
    for a, b in zip(trained.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def text_states(n, d, seed):
    """Text phases that disagree with the image prior (uniform), radii and a V component."""
    g = np.random.default_rng(seed)
    basis = np.linalg.qr(g.standard_normal((d, 2 * M)))[0]
    v0 = g.standard_normal((n, d)) * 0.05
    v0 = v0 - (v0 @ basis) @ basis.T
    return g.uniform(-np.pi, np.pi, (n, M)), g.uniform(0.5, 1.5, (n, M)), v0, basis


@pytest.mark.parametrize("losses", [("prior", "phase"), ("prior",)])
def test_stage2_lowers_L_II_plus_lambda_L_Phi(stage1, losses):
    prior, _, score_net, _ = stage1
    d = 10
    theta0, rho0, v0, basis = text_states(4000, d, 2)
    refiner = build_refiner(M, d, hidden=32, layers=2, seed=0)
    objective = Stage2Objective(losses, lambda_phi=1.0)
    bounds = Bounds(0.5, 0.2, 0.002)
    g = torch.Generator().manual_seed(5)
    batch = [torch.tensor(a[:2000], dtype=torch.float32) for a in (theta0, rho0, v0)]
    t, noise = torch.rand(2000, 1, generator=g), torch.randn(2000, M, generator=g)
    kw = dict(basis=torch.tensor(basis, dtype=torch.float32), prior_t=prior.to_torch(),
              edges=torch.tensor(prior.edges), score_net=score_net, objective=objective, bounds=bounds,
              diffusion=DIFF, eps=1e-8, t=t, noise=noise)
    with torch.no_grad():
        before = stage2_terms(refiner, batch, **kw)
    assert float(before.get("L_Phi", torch.zeros(1)).abs().max()) == 0.0  # zero-initialised head: no deformation
    loop = LoopConfig(steps=150, batch_size=256, lr=3e-3, seed=1, eval_every=50, log_every=50, val_size=512)
    history = train_refiner(refiner, theta0, rho0, v0, basis=basis, prior=prior, score_net=score_net,
                            objective=objective, bounds=bounds, diffusion=DIFF, eps=1e-8, loop=loop)
    with torch.no_grad():
        after = stage2_terms(refiner, batch, **kw)
    assert float(after["objective"].mean()) < float(before["objective"].mean()) - 0.01
    if "phase" in losses:
        assert float(after["L_Phi"].mean()) > 0  # the refinement moved phases, and L_Phi measured it
        assert "stage2_L_Phi" in history
    assert history["stage2_objective_val"][-1] < history["stage2_objective_val"][0]
    assert history["stage2_objective_val_step"][-1] == 150.0


def test_phase_only_objective_is_stationary_at_zero_refinement(stage1):
    """L_Phi >= 0 vanishes with zero gradient at the zero-initialised head: g_eta never moves."""
    prior, _, _, _ = stage1
    d = 10
    theta0, rho0, v0, basis = text_states(1000, d, 3)
    refiner = build_refiner(M, d, hidden=16, layers=1, seed=0)
    start = copy.deepcopy(refiner.state_dict())
    train_refiner(refiner, theta0, rho0, v0, basis=basis, prior=prior, score_net=None,
                  objective=Stage2Objective(("phase",)), bounds=Bounds(), diffusion=DIFF, eps=1e-8,
                  loop=LoopConfig(steps=20, batch_size=128, lr=1e-2))
    assert torch.equal(refiner.state_dict()["head.weight"], start["head.weight"])
    assert float(refiner.state_dict()["head.weight"].abs().max()) == 0.0


def test_early_stopping_ends_the_run_and_restores_the_best_model(stage1):
    prior, _, _, _ = stage1
    theta, rho = image_phases(3000, 4)
    net = build_score_net(M, hidden=16, layers=1, fourier=2, sigma_min=0.01, sigma_max=1.0, seed=0)
    initial = copy.deepcopy(net.state_dict())
    loop = LoopConfig(steps=500, batch_size=128, lr=1e-3, eval_every=10, log_every=10, patience=2, min_delta=0.5)
    history = train_score_net(net, theta, rho, prior, diffusion=DIFF, loop=loop)
    assert history["_steps_run"] == [20.0]  # two evaluations without a 50 % improvement
    assert history["stage1_L_I_val_step"] == [0.0, 10.0, 20.0]
    # no evaluation beat the untrained model by 50 %, so the step-0 weights are the best and are restored
    for key, value in net.state_dict().items():
        assert torch.equal(value, initial[key])


def test_stage1_validates_on_held_out_images_and_stops_on_a_plateau(stage1):
    prior = stage1[0]
    theta, rho = image_phases(3000, 5)
    val_theta, val_rho = image_phases(1024, 6)
    net = build_score_net(M, hidden=32, layers=2, fourier=4, sigma_min=0.01, sigma_max=1.0, seed=3)
    loop = LoopConfig(steps=20_000, batch_size=256, lr=3e-3, seed=0, eval_every=100, log_every=50, val_size=1024,
                      patience=3, min_delta=1e-2)
    history = train_score_net(net, theta, rho, prior, diffusion=DIFF, loop=loop, val_theta=val_theta, val_rho=val_rho)
    steps = history["_steps_run"][0]
    assert steps < 20_000  # the plateau of held-out L_I ended the run
    assert history["stage1_L_I_val_step"][-1] == steps
    curve = history["stage1_L_I_val"]
    assert min(curve) < 0.8 * curve[0]
    # the validation rows are the held-out images: the curve differs from one measured on the training rows
    other = build_score_net(M, hidden=32, layers=2, fourier=4, sigma_min=0.01, sigma_max=1.0, seed=3)
    on_train = train_score_net(other, theta, rho, prior, diffusion=DIFF, loop=loop.derive(steps=1))
    assert on_train["stage1_L_I_val"][0] != curve[0]


def test_plateaus_first_lower_the_learning_rate_then_stop(stage1):
    prior = stage1[0]
    theta, rho = image_phases(3000, 5)
    net = build_score_net(M, hidden=32, layers=2, fourier=4, sigma_min=0.01, sigma_max=1.0, seed=3)
    loop = LoopConfig(steps=20_000, batch_size=256, lr=3e-3, seed=0, eval_every=100, log_every=50, val_size=1024,
                      patience=2, min_delta=1e-2, lr_decays=2, lr_decay_factor=0.3)
    history = train_score_net(net, theta, rho, prior, diffusion=DIFF, loop=loop)
    decays = history["_lr_decay_steps"]
    assert len(decays) == 2 and decays[0] < decays[1] < history["_steps_run"][0] < 20_000
