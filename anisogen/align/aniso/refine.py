"""Stage II-b: instance-conditioned bounded refinement g_eta and its losses (spec §2.7-§2.8, eqs. 7-9).

* :class:`Refiner` g_eta: [sin theta0; cos theta0; log rho0; v0] (3m + d) -> (dtheta, drho, dv) (m, m, d).
  An MLP with LayerNorm + SiLU hidden layers [INF] whose **last layer is zero-initialised**, so training
  starts exactly at the global initialisation. No loss of the paper depends on v_hat (L_II and L_Phi
  live on the U-side phases and radii), so dv never receives a gradient and stays at its zero start;
  ``with_v=False`` drops that head (v_hat = v0, the same output at a fraction of the cost) [INF].
* :func:`bounded_update` (eq. 7): theta_hat = wrap(theta0 + a_theta tanh(dtheta)),
  rho_hat = rho0 exp(a_rho tanh(drho)), v_hat = v0 + a_v P_V tanh(dv - Q_U Q_U^T dv). The extra P_V after the
  elementwise tanh keeps v_hat exactly in V [INF] (``reproject_v``). Hence |theta_hat - theta0| <= a_theta
  (on the circle) and rho_hat / rho0 in [e^-a_rho, e^a_rho].
* :func:`phase_deformation_loss` L_Phi (eq. 9): (1/|E|) sum_{(k,l) in E} w_kl [1 - cos((theta_hat_k - theta_hat_l)
  - (theta0_k - theta0_l))], w_kl = rho0_k rho0_l / (sum_E rho0_u rho0_v + eps) (``normalization="paper"``).
  Since the w_kl sum to 1, this is at most 2/|E|, against L_II's sum over m blocks; ``"sum"`` [INF] drops the
  1/|E| and rescales the weights to mean 1 over E, |E| w_kl, so L_Phi is a sum over edges of the same
  order as L_II (a sum over blocks) and lambda_Phi = 1 weighs them alike. It is evaluated on the
  bounded increments delta = a_theta tanh(dtheta), since (theta_hat_k - theta_hat_l) - (theta0_k - theta0_l) =
  delta_k - delta_l mod 2 pi and cos is 2 pi-periodic: same value, and exactly zero (with zero gradient)
  at zero refinement, free of wrap rounding.
* L_II (eq. 8) is :func:`anisogen.align.aniso.prior.dsm_loss` evaluated at (theta_hat, log rho_hat) with the
  frozen s_phi. L_G [INF] (:func:`anisogen.align.aniso.prior.guidance_loss`) is the one-step denoising
  guidance objective that the paper says L_II replaces. :func:`identity_regulariser` 1e-3 ||tanh(.)||^2
  trains the refinement-only ablation in the "objectives" reading (spec Q3).
* :func:`train_refiner` minimises the chosen sum (default L_II + lambda_Phi L_Phi) over eta only, on text
  initial states; everything else is frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .polar import wrap
from .prior import DiffusionConfig, PhasePrior, ScoreNet, dsm_loss, guidance_loss
from .training import BatchSampler, LoopConfig, TrainingLoop

STAGE2_LOSSES = ("prior", "guidance", "phase", "identity")
PHASE_NORMALIZATIONS = ("sum", "paper")


class Refiner(nn.Module):
    """g_eta: (B, 3m + d) features -> (dtheta (B, m), drho (B, m), dv (B, d) or None without the V head)."""

    def __init__(self, blocks: int, dim: int, hidden: int, layers: int, with_v: bool = True) -> None:
        super().__init__()
        self.blocks, self.dim, self.with_v = int(blocks), int(dim), bool(with_v)
        width = 3 * self.blocks + self.dim
        mods: list[nn.Module] = []
        for _ in range(int(layers)):
            mods += [nn.Linear(width, int(hidden)), nn.LayerNorm(int(hidden)), nn.SiLU()]
            width = int(hidden)
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(width, 2 * self.blocks + (self.dim if self.with_v else 0))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = self.head(self.body(features))
        m = self.blocks
        return out[:, :m], out[:, m : 2 * m], (out[:, 2 * m :] if self.with_v else None)


def build_refiner(blocks: int, dim: int, *, hidden: int, layers: int, seed: int, with_v: bool = True) -> Refiner:
    """A fresh :class:`Refiner` (hidden weights a pure function of ``seed``; the head is zero)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return Refiner(blocks, dim, hidden, layers, with_v)


def refiner_features(theta0: torch.Tensor, rho0: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """[sin theta0; cos theta0; log rho0; v0], (B, 3m + d)."""
    return torch.cat([torch.sin(theta0), torch.cos(theta0), torch.log(rho0), v0], dim=-1)


@dataclass(frozen=True)
class Bounds:
    """alpha_theta (rad), alpha_rho (log-radius), alpha_v (per coordinate) and the V re-projection switch."""

    alpha_theta: float = 0.2
    alpha_rho: float = 0.1
    alpha_v: float = 0.002
    reproject_v: bool = True

    @property
    def kappa(self) -> float:
        """Per-block bound factor kappa = sqrt((e^a_rho - 1)^2 + 4 e^a_rho sin^2(a_theta / 2)) (App. A.7.2)."""
        e = np.exp(self.alpha_rho)
        return float(np.sqrt((e - 1.0) ** 2 + 4.0 * e * np.sin(self.alpha_theta / 2.0) ** 2))


def kappa_bounds(target_kappa: float, *, rho_ratio: float = 0.5, alpha_v: float = 0.0) -> Bounds:
    """The bounds with kappa(alpha_theta, alpha_rho) = ``target_kappa`` and alpha_rho = rho_ratio * alpha_theta.

    kappa grows monotonically with alpha_theta along that ray, so a bisection finds it (alpha_theta is
    capped at pi). Used to scale the bounds to the data [INF]: kappa E||c0|| = a fraction of the median
    text k-NN distance.
    """
    if target_kappa <= 0:
        return Bounds(0.0, 0.0, alpha_v)
    lo, hi = 0.0, float(np.pi)
    if Bounds(hi, rho_ratio * hi).kappa <= target_kappa:
        return Bounds(hi, rho_ratio * hi, alpha_v)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if Bounds(mid, rho_ratio * mid).kappa < target_kappa else (lo, mid)
    return Bounds(hi, rho_ratio * hi, alpha_v)


def project_v(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P_V x = x - B B^T x for rows x (B, d) and an orthonormal (d, r) basis of U."""
    return x - (x @ basis) @ basis.T


def bounded_update(theta0, rho0, v0, dtheta, drho, dv, basis: torch.Tensor, bounds: Bounds):
    """Eq. 7. Returns (theta_hat, rho_hat, v_hat, delta_theta) with delta_theta = a_theta tanh(dtheta).

    ``dv`` None (a refiner without the V head) leaves v_hat = v0."""
    delta = bounds.alpha_theta * torch.tanh(dtheta)
    theta_hat = wrap(theta0 + delta)
    rho_hat = rho0 * torch.exp(bounds.alpha_rho * torch.tanh(drho))
    if dv is None:
        return theta_hat, rho_hat, v0, delta
    step_v = torch.tanh(project_v(dv, basis))
    if bounds.reproject_v:
        step_v = project_v(step_v, basis)
    return theta_hat, rho_hat, v0 + bounds.alpha_v * step_v, delta


def phase_deformation_loss(delta: torch.Tensor, rho0: torch.Tensor, edges: torch.Tensor, eps: float,
                           normalization: str = "paper") -> torch.Tensor:
    """L_Phi per sample (B,) from the phase increments delta (B, m), radii rho0 (B, m), edges (|E|, 2).

    ``normalization``: ``"paper"`` = eq. 9, (1/|E|) sum_E w_kl (1 - cos), w summing to 1; ``"sum"`` [INF] =
    sum_E |E| w_kl (1 - cos), the weights rescaled to mean 1 (|E|^2 times the paper's value).
    """
    if normalization not in PHASE_NORMALIZATIONS:
        raise ValueError(f"L_Phi normalization must be one of {PHASE_NORMALIZATIONS}, got {normalization!r}")
    if edges.shape[0] == 0:
        return torch.zeros(delta.shape[0], dtype=delta.dtype, device=delta.device)
    i, j = edges[:, 0], edges[:, 1]
    w = rho0[:, i] * rho0[:, j]
    w = w / (w.sum(-1, keepdim=True) + eps)
    total = (w * (1.0 - torch.cos(delta[:, i] - delta[:, j]))).sum(-1)
    n_edges = edges.shape[0]
    return total * n_edges if normalization == "sum" else total / n_edges


def identity_regulariser(dtheta, drho, dv, weight: float = 1e-3) -> torch.Tensor:
    """weight * ||tanh([dtheta, drho, dv])||^2 per sample (B,): the refinement-only ablation's objective (Q3)."""
    total = torch.tanh(dtheta).pow(2).sum(-1) + torch.tanh(drho).pow(2).sum(-1)
    if dv is not None:
        total = total + torch.tanh(dv).pow(2).sum(-1)
    return weight * total


@dataclass
class Stage2Objective:
    """Which terms train g_eta and their weights: ``losses`` subset of ("prior", "phase", "identity")."""

    losses: tuple[str, ...]
    lambda_phi: float = 1.0
    identity_weight: float = 1e-3
    prior_gradient: str = "full"
    phase_normalization: str = "paper"


def stage2_terms(refiner: Refiner, batch, *, basis, prior_t, edges, score_net: ScoreNet | None,
                 objective: Stage2Objective,
                 bounds: Bounds, diffusion: DiffusionConfig, eps: float, t, noise) -> dict[str, torch.Tensor]:
    """Per-sample loss terms (B,) for a batch (theta0, rho0, v0): keys among L_II, L_Phi, identity, objective."""
    theta0, rho0, v0 = batch
    dtheta, drho, dv = refiner(refiner_features(theta0, rho0, v0))
    theta_hat, rho_hat, _, delta = bounded_update(theta0, rho0, v0, dtheta, drho, dv, basis, bounds)
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros(theta0.shape[0], dtype=theta0.dtype, device=theta0.device)
    if "prior" in objective.losses:
        if score_net is None:
            raise ValueError("the L_II term needs the Stage-I score network")
        terms["L_II"] = dsm_loss(score_net, theta_hat, torch.log(rho_hat), prior_t, t=t, noise=noise, tau=diffusion.tau,
                                 sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max,
                                 n_terms=diffusion.n_terms, gradient=objective.prior_gradient)
        total = total + terms["L_II"]
    if "guidance" in objective.losses:
        if score_net is None:
            raise ValueError("the L_G term needs the Stage-I score network")
        terms["L_G"] = guidance_loss(score_net, theta_hat, torch.log(rho_hat), prior_t, t=t, noise=noise,
                                     tau=diffusion.tau, sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max)
        total = total + terms["L_G"]
    if "phase" in objective.losses:
        terms["L_Phi"] = phase_deformation_loss(delta, rho0, edges, eps, objective.phase_normalization)
        total = total + objective.lambda_phi * terms["L_Phi"]
    if "identity" in objective.losses:
        terms["identity"] = identity_regulariser(dtheta, drho, dv, objective.identity_weight)
        total = total + terms["identity"]
    terms["objective"] = total
    return terms


def train_refiner(refiner: Refiner, theta0: np.ndarray, rho0: np.ndarray, v0: np.ndarray, *, basis: np.ndarray,
                  prior: PhasePrior, score_net: ScoreNet | None, objective: Stage2Objective, bounds: Bounds,
                  diffusion: DiffusionConfig, eps: float, loop: LoopConfig) -> dict:
    """Stage II: train g_eta on text initial states (theta0, rho0 (n, m), v0 (n, d)); s_phi stays frozen.

    The validation value is the objective on the first ``loop.val_size`` rows with fixed (t, eps). History
    keys: ``stage2_objective`` and one curve per active term (``stage2_L_II``, ``stage2_L_Phi``,
    ``stage2_identity``), window means, plus ``stage2_objective_val`` / ``_val_step``. ``refiner`` ends on
    CPU in eval mode with ``requires_grad`` off.
    """
    unknown = set(objective.losses) - set(STAGE2_LOSSES)
    if unknown:
        raise ValueError(f"unknown Stage II loss(es) {sorted(unknown)}; known: {STAGE2_LOSSES}")
    device = torch.device(loop.device)
    refiner.to(device).train()
    if score_net is not None:
        score_net.to(device).eval().requires_grad_(False)
    data = [torch.as_tensor(a, dtype=torch.float32) for a in (theta0, rho0, v0)]
    basis_t = torch.as_tensor(basis, dtype=torch.float32, device=device)
    prior_t = prior.to_torch(device)
    edges = torch.as_tensor(prior.edges, dtype=torch.long, device=device)
    m = data[0].shape[1]
    gen = torch.Generator().manual_seed(int(loop.seed) + 2)
    n_val = min(loop.val_size, data[0].shape[0])
    val_batch = [a[:n_val].to(device) for a in data]
    val_t, val_noise = torch.rand(n_val, 1, generator=gen).to(device), torch.randn(n_val, m, generator=gen).to(device)
    sampler = BatchSampler(data[0].shape[0], loop.batch_size, loop.seed)
    opt = torch.optim.AdamW(refiner.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    kw = dict(basis=basis_t, prior_t=prior_t, edges=edges, score_net=score_net, objective=objective, bounds=bounds,
              diffusion=diffusion, eps=eps)

    def step(_):
        idx = sampler.next()
        t = torch.rand(len(idx), 1, generator=gen).to(device)
        noise = torch.randn(len(idx), m, generator=gen).to(device)
        terms = stage2_terms(refiner, [a[idx].to(device) for a in data], t=t, noise=noise, **kw)
        loss = terms["objective"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {f"stage2_{name}": float(value.detach().mean()) for name, value in terms.items()}

    def evaluate():
        with torch.no_grad():
            terms = stage2_terms(refiner, val_batch, t=val_t, noise=val_noise, **kw)
        return float(terms["objective"].mean())

    history = TrainingLoop(loop, "Stage II (refiner)", step, evaluate, key="stage2_objective",
                           best_state=lambda: copy.deepcopy(refiner.state_dict())).run()
    best = history.pop("_best_state", None)
    if best is not None:
        refiner.load_state_dict(best)
    refiner.to("cpu").eval().requires_grad_(False)
    return history
