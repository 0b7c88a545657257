"""Stage I: the target-modality periodic phase prior, learned from images only (spec §2.5, eqs. 3-6).

From the polar coordinates (rho, theta) of the image sample in the mixed frame (raw, uncentred x):

* :func:`phase_statistics` -> :class:`PhasePrior`: anchors psi_k = arg E[e^{i theta_k}], block weights
  alpha_k = E[rho_k^2] / (sum_u E[rho_u^2] + eps), circular correlations M_kl = E[e^{i(theta_k - theta_l)}]
  (eq. 3) with A = |M| and eta = arg M, and the sparse graph E: the union over blocks k of the
  ``partners`` (p) blocks l != k with the largest |M_kl|, as undirected pairs (k < l).
* :func:`potential` Psi(phi) = sum_k alpha_k [1 - cos(phi_k - psi_k)]
  + sum_{(k,l) in E} A_kl [1 - cos(phi_k - phi_l - eta_kl)]
  and its closed-form gradient :func:`potential_grad` (eq. 4), the drift field.
* :func:`wrapped_gaussian_score`: d/dx log q(x | mu, s^2) of the wrapped Gaussian, summed over
  |n| <= n_terms images (3, raised automatically when s is large) [INF].
* :class:`ScoreNet` s_phi(phi~, t, log rho), parameterised as -eps_hat / (sqrt(2) sigma_t) [INF]: an MLP on
  [sin phi~, cos phi~, log rho, Fourier(log sigma_t)] predicting the noise eps_hat.
* :func:`dsm_loss` is eq. 6: mu = wrap(phi - tau grad Psi(phi)) (eq. 5), phi~ = wrap(mu + sqrt(2) sigma_t eps),
  L = lambda_t ||s_phi(phi~, t, log rho) - grad log q(phi~ | mu, sigma_t)||^2 with lambda_t = 2 sigma_t^2,
  computed as ||eps_hat + sqrt(2) sigma_t grad log q||^2 (identical, better conditioned).
  Times t ~ U(0, 1), sigma_t = sigma_min^{1-t} sigma_max^t [INF]. The same function is Stage II's L_II.
* :func:`train_score_net` trains s_phi with AdamW on mini-batches of the image sample, then freezes it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .polar import wrap
from .training import BatchSampler, LoopConfig, TrainingLoop

SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------- statistics
@dataclass
class PhasePrior:
    """Stage-I statistics (float64 NumPy). m blocks, |E| edges.

    anchor (m,) psi_k in [-pi, pi]; weights (m,) alpha_k; strength (m, m) A = |M| (symmetric, zero
    diagonal); offset (m, m) eta = arg M (antisymmetric); edges (|E|, 2) int64 pairs (k, l), k < l,
    sorted; edge_strength / edge_offset (|E|,) = A_kl / eta_kl on those pairs.
    """

    anchor: np.ndarray
    weights: np.ndarray
    strength: np.ndarray
    offset: np.ndarray
    edges: np.ndarray

    @property
    def blocks(self) -> int:
        return self.anchor.shape[0]

    @property
    def edge_strength(self) -> np.ndarray:
        return self.strength[self.edges[:, 0], self.edges[:, 1]]

    @property
    def edge_offset(self) -> np.ndarray:
        return self.offset[self.edges[:, 0], self.edges[:, 1]]

    def tensors(self) -> dict[str, np.ndarray]:
        return {"prior.anchor": self.anchor, "prior.weights": self.weights, "prior.strength": self.strength,
                "prior.offset": self.offset, "prior.edges": self.edges.astype(np.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> "PhasePrior":
        return cls(tensors["prior.anchor"], tensors["prior.weights"], tensors["prior.strength"],
                   tensors["prior.offset"], tensors["prior.edges"].astype(np.int64))

    def to_torch(self, device="cpu", dtype=torch.float32) -> "TorchPrior":
        return TorchPrior(self, device, dtype)


def select_edges(strength: np.ndarray, partners: int) -> np.ndarray:
    """The block-adaptive sparse graph E: for each k the top-``partners`` l != k by strength, as sorted
    undirected pairs (k, l) with k < l, shape (|E|, 2) int64. Ties go to the lower index."""
    m = strength.shape[0]
    p = min(int(partners), m - 1)
    if p < 0:
        raise ValueError(f"partners p must be >= 0, got {partners}")
    pairs = set()
    for k in range(m):
        row = np.array(strength[k], dtype=np.float64)
        row[k] = -np.inf
        for partner in np.argsort(-row, kind="stable")[:p]:
            pairs.add((min(k, int(partner)), max(k, int(partner))))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def phase_statistics(rho: np.ndarray, theta: np.ndarray, *, partners: int, eps: float) -> PhasePrior:
    """Stage-I statistics of image polar coordinates ``rho``, ``theta`` (n, m) -> :class:`PhasePrior`."""
    rho = np.asarray(rho, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    z = np.exp(1j * theta)
    anchor = np.angle(z.mean(axis=0))
    energy = np.mean(rho**2, axis=0)
    weights = energy / (energy.sum() + eps)
    m_corr = (z.T @ np.conj(z)) / z.shape[0]  # M_kl = E[e^{i theta_k} e^{-i theta_l}]
    strength = np.abs(m_corr)
    np.fill_diagonal(strength, 0.0)
    offset = np.angle(m_corr)
    offset = (offset - offset.T) / 2.0  # exact antisymmetry (M is Hermitian up to rounding)
    np.fill_diagonal(offset, 0.0)
    strength = (strength + strength.T) / 2.0
    return PhasePrior(anchor, weights, strength, offset, select_edges(strength, partners))


class TorchPrior:
    """A :class:`PhasePrior` as torch tensors on one device, with the edge incidence matrix (|E|, m)."""

    def __init__(self, prior: PhasePrior, device="cpu", dtype=torch.float32) -> None:
        def t(a):
            return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

        self.anchor, self.weights = t(prior.anchor), t(prior.weights)
        self.edge_i = torch.as_tensor(prior.edges[:, 0], dtype=torch.long, device=device)
        self.edge_j = torch.as_tensor(prior.edges[:, 1], dtype=torch.long, device=device)
        self.edge_strength, self.edge_offset = t(prior.edge_strength), t(prior.edge_offset)
        incidence = np.zeros((prior.edges.shape[0], prior.blocks))
        incidence[np.arange(prior.edges.shape[0]), prior.edges[:, 0]] = 1.0
        incidence[np.arange(prior.edges.shape[0]), prior.edges[:, 1]] = -1.0
        self.incidence = t(incidence)


def potential(phi: torch.Tensor, prior: TorchPrior) -> torch.Tensor:
    """Psi(phi) for phases (..., m) -> (...,): the periodic potential of spec App. A.8.3."""
    marginal = (prior.weights * (1.0 - torch.cos(phi - prior.anchor))).sum(-1)
    diff = phi[..., prior.edge_i] - phi[..., prior.edge_j] - prior.edge_offset
    coupling = (prior.edge_strength * (1.0 - torch.cos(diff))).sum(-1)
    return marginal + coupling


def potential_grad(phi: torch.Tensor, prior: TorchPrior) -> torch.Tensor:
    """Closed-form drift (eq. 4):
    [grad Psi(phi)]_k = alpha_k sin(phi_k - psi_k) + sum_{l:(k,l) in E} A_kl sin(phi_k - phi_l - eta_kl).

    Each undirected edge adds +A sin(.) to its first block and -A sin(.) = A sin(phi_l - phi_k - eta_lk) to
    its second (eta_lk = -eta_kl), done with the incidence matrix (deterministic on every device).
    """
    diff = phi[..., prior.edge_i] - phi[..., prior.edge_j] - prior.edge_offset
    return prior.weights * torch.sin(phi - prior.anchor) + (prior.edge_strength * torch.sin(diff)) @ prior.incidence


# ---------------------------------------------------------------------------- wrapped Gaussian
def _images(var: torch.Tensor, n_terms: int) -> int:
    s = float(torch.sqrt(torch.as_tensor(var).max()))
    return max(int(n_terms), int(math.ceil(4.0 * s / (2.0 * math.pi))) + 1)


def _offsets(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, n_terms: int) -> torch.Tensor:
    n = _images(var, n_terms)
    shifts = 2.0 * math.pi * torch.arange(-n, n + 1, dtype=x.dtype, device=x.device)
    return wrap(x - mu).unsqueeze(-1) + shifts  # (..., 2n + 1)


def wrapped_gaussian_logpdf(x: torch.Tensor, mu: torch.Tensor, var, n_terms: int = 3) -> torch.Tensor:
    """log q(x | mu, var) per coordinate, q the Gaussian N(mu, var) wrapped onto [-pi, pi)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    dn = _offsets(x, mu, var, n_terms)
    v = var.unsqueeze(-1) if var.dim() else var
    return torch.logsumexp(-dn**2 / (2.0 * v), dim=-1) - 0.5 * torch.log(2.0 * math.pi * var)


def wrapped_gaussian_score(x: torch.Tensor, mu: torch.Tensor, var, n_terms: int = 3) -> torch.Tensor:
    """d/dx log q(x | mu, var) = sum_n w_n (-(x - mu + 2 pi n) / var),
    w_n = softmax_n(-(x - mu + 2 pi n)^2 / (2 var))."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    dn = _offsets(x, mu, var, n_terms)
    v = var.unsqueeze(-1) if var.dim() else var
    w = torch.softmax(-dn**2 / (2.0 * v), dim=-1)
    return (w * (-dn / v)).sum(-1)


def sigma_schedule(t: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """sigma_t = sigma_min^(1 - t) sigma_max^t (geometric schedule) [INF]."""
    return sigma_min * torch.exp(t * (math.log(sigma_max) - math.log(sigma_min)))


# ------------------------------------------------------------------------------ score network
class ScoreNet(nn.Module):
    """s_phi(phi~, t, log rho) = -eps_hat(.) / (sqrt(2) sigma_t).

    eps_hat is an MLP: [sin phi~, cos phi~, log rho, Fourier(log sigma_t)] (3m + 1 + 2F) -> ``layers``
    hidden SiLU layers of width ``hidden`` -> m. The Fourier features of u = normalised log sigma_t in
    [0, 1] are u and sin/cos(2^j pi u), j < F.
    """

    def __init__(self, blocks: int, hidden: int, layers: int, fourier: int, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        self.blocks, self.fourier = int(blocks), int(fourier)
        self.log_sigma_min, self.log_sigma_max = math.log(sigma_min), math.log(sigma_max)
        width = 3 * self.blocks + 1 + 2 * self.fourier
        mods: list[nn.Module] = []
        for _ in range(int(layers)):
            mods += [nn.Linear(width, int(hidden)), nn.SiLU()]
            width = int(hidden)
        mods.append(nn.Linear(width, self.blocks))
        self.mlp = nn.Sequential(*mods)

    def time_features(self, sigma: torch.Tensor) -> torch.Tensor:
        span = self.log_sigma_max - self.log_sigma_min
        u = (torch.log(sigma) - self.log_sigma_min) / (span if span > 0 else 1.0)
        freqs = math.pi * 2.0 ** torch.arange(self.fourier, dtype=sigma.dtype, device=sigma.device)
        return torch.cat([u, torch.sin(u * freqs), torch.cos(u * freqs)], dim=-1)

    def forward(self, phi: torch.Tensor, sigma: torch.Tensor, log_rho: torch.Tensor) -> torch.Tensor:
        """Predicted noise eps_hat (B, m) for phases phi (B, m), sigma_t (B, 1) and log radii (B, m)."""
        feats = torch.cat([torch.sin(phi), torch.cos(phi), log_rho, self.time_features(sigma)], dim=-1)
        return self.mlp(feats)

    def score(self, phi: torch.Tensor, sigma: torch.Tensor, log_rho: torch.Tensor) -> torch.Tensor:
        """s_phi = -eps_hat / (sqrt(2) sigma_t), (B, m)."""
        return -self.forward(phi, sigma, log_rho) / (SQRT2 * sigma)


def dsm_loss(net: ScoreNet, phi: torch.Tensor, log_rho: torch.Tensor, prior: TorchPrior, *, t: torch.Tensor,
             noise: torch.Tensor, tau: float, sigma_min: float, sigma_max: float, n_terms: int = 3,
             gradient: str = "full") -> torch.Tensor:
    """Per-sample wrapped-Gaussian DSM loss (B,) of eqs. 5-6 (Stage I's L_I; Stage II's L_II with phi = theta_hat).

    Args:
        phi: clean phases (B, m); log_rho: (B, m) conditioning radii; t: (B, 1) times in [0, 1];
        noise: eps ~ N(0, I) (B, m); tau: drift step; gradient: ``"full"`` backpropagates through the
        score network (spec Q5 default) or ``"sds"``: the value is the same, but the gradient reaching phi~
        is -lambda_t (s_phi - grad log q), without the network's Jacobian (score distillation), so a
        descent step moves phi~ up the prior's score.
    """
    sigma = sigma_schedule(t, sigma_min, sigma_max)
    mu = wrap(phi - tau * potential_grad(phi, prior))
    perturbed = wrap(mu + SQRT2 * sigma * noise)
    # the target depends only on wrap(phi~ - mu) = wrap(sqrt(2) sigma eps): no gradient reaches phi through it
    target = wrapped_gaussian_score(perturbed.detach(), mu.detach(), 2.0 * sigma.detach() ** 2, n_terms)
    if gradient == "full":
        residual = net(perturbed, sigma, log_rho) + SQRT2 * sigma * target
        return (residual**2).sum(-1)
    if gradient != "sds":
        raise ValueError(f"prior gradient must be 'full' or 'sds', got {gradient!r}")
    residual = net(perturbed.detach(), sigma, log_rho.detach()) + SQRT2 * sigma * target
    value = (residual**2).sum(-1).detach()
    # residual = -sqrt(2) sigma (s_phi - target), so sqrt(2) sigma residual = -lambda_t (s_phi - target): the
    # surrogate's gradient. Descent then moves phi~ along +lambda_t (s_phi - target), i.e. up the prior's
    # score (towards its modes); -target is the zero-mean control variate of score distillation.
    direction = (SQRT2 * sigma * residual).detach()
    surrogate = (direction * perturbed).sum(-1)
    return value + surrogate - surrogate.detach()


def guidance_loss(net: ScoreNet, phi: torch.Tensor, log_rho: torch.Tensor, prior: TorchPrior, *, t: torch.Tensor,
                  noise: torch.Tensor, tau: float, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """One-step denoising guidance L_G per sample (B,) [INF]: the objective the paper says L_II replaces.

    phi~ = wrap(mu_phi + sqrt(2) sigma_t eps) is drawn exactly as in :func:`dsm_loss`; the frozen prior
    denoises it in one Tweedie step, target = wrap(phi~ + 2 sigma_t^2 s_phi(phi~)) (the posterior-mean
    estimate of the clean phase), and phi is regressed towards the stop-gradient target on the circle:
    L_G = sum_k 2 [1 - cos(phi_k - target_k)] (= sum_k wrap(phi_k - target_k)^2 near the target). The
    gradient reaches phi directly, never through the network, so it is well defined for any s_phi.
    """
    sigma = sigma_schedule(t, sigma_min, sigma_max)
    with torch.no_grad():
        mu = wrap(phi - tau * potential_grad(phi, prior))
        perturbed = wrap(mu + SQRT2 * sigma * noise)
        target = wrap(perturbed + 2.0 * sigma**2 * net.score(perturbed, sigma, log_rho))
    return (2.0 * (1.0 - torch.cos(phi - target))).sum(-1)


def build_score_net(blocks: int, *, hidden: int, layers: int, fourier: int, sigma_min: float, sigma_max: float,
                    seed: int) -> ScoreNet:
    """A freshly initialised :class:`ScoreNet` (initial weights a pure function of ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return ScoreNet(blocks, hidden, layers, fourier, sigma_min, sigma_max)


@dataclass
class DiffusionConfig:
    """tau: drift step of eq. 5; sigma_min/sigma_max: the noise schedule; n_terms: wrapped-Gaussian images."""

    tau: float = 0.1
    sigma_min: float = 0.01
    sigma_max: float = 1.0
    n_terms: int = 3


def train_score_net(net: ScoreNet, theta: np.ndarray, rho: np.ndarray, prior: PhasePrior, *, diffusion: DiffusionConfig,
                    loop: LoopConfig, val_theta: np.ndarray | None = None, val_rho: np.ndarray | None = None) -> dict:
    """Stage I: fit ``net`` on image phases ``theta`` and radii ``rho`` (n, m) by DSM (eq. 6), then freeze it.

    Mini-batches are drawn from the sample; t ~ U(0, 1) and eps ~ N(0, I) per row. The validation value
    is the mean L_I with fixed (t, eps) on the first ``loop.val_size`` rows of the *held-out* images
    ``val_theta`` / ``val_rho`` when given (images never trained on), else of the training rows. With
    ``loop.patience``, a plateau of this value first lowers the learning rate (``loop.lr_decays`` times, from
    the best weights so far), then stops the run. Returns the history:
    ``stage1_L_I`` (window means), ``stage1_L_I_val`` / ``_val_step``. ``net`` ends on CPU, in eval mode,
    with ``requires_grad`` off.
    """
    device = torch.device(loop.device)
    net.to(device).train()
    tp = prior.to_torch(device)
    theta_t = torch.as_tensor(theta, dtype=torch.float32)
    log_rho_t = torch.log(torch.as_tensor(rho, dtype=torch.float32))
    m = theta_t.shape[1]
    gen = torch.Generator().manual_seed(int(loop.seed) + 1)
    val_theta_t, val_log_rho_t = theta_t, log_rho_t
    if val_theta is not None and len(val_theta):
        val_theta_t = torch.as_tensor(val_theta, dtype=torch.float32)
        val_log_rho_t = torch.log(torch.as_tensor(val_rho, dtype=torch.float32))
    n_val = min(loop.val_size, val_theta_t.shape[0])
    val = (val_theta_t[:n_val].to(device), val_log_rho_t[:n_val].to(device),
           torch.rand(n_val, 1, generator=gen).to(device), torch.randn(n_val, m, generator=gen).to(device))
    sampler = BatchSampler(theta_t.shape[0], loop.batch_size, loop.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    kw = dict(
        tau=diffusion.tau, sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max, n_terms=diffusion.n_terms
    )

    def step(_):
        idx = sampler.next()
        t = torch.rand(len(idx), 1, generator=gen).to(device)
        noise = torch.randn(len(idx), m, generator=gen).to(device)
        loss = dsm_loss(net, theta_t[idx].to(device), log_rho_t[idx].to(device), tp, t=t, noise=noise, **kw).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"stage1_L_I": float(loss.detach())}

    def evaluate():
        with torch.no_grad():
            return float(dsm_loss(net, val[0], val[1], tp, t=val[2], noise=val[3], **kw).mean())

    def on_plateau(best):
        if best is not None:
            net.load_state_dict(best)
        for group in opt.param_groups:
            group["lr"] *= loop.lr_decay_factor

    history = TrainingLoop(loop, "Stage I (score net)", step, evaluate, key="stage1_L_I",
                           best_state=lambda: copy.deepcopy(net.state_dict()), on_plateau=on_plateau).run()
    best = history.pop("_best_state", None)
    if best is not None:
        net.load_state_dict(best)
    net.to("cpu").eval().requires_grad_(False)
    return history
