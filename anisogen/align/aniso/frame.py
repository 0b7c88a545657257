"""The fixed frame U ⊕ V of AnisoAlign (spec §2.2-§2.3, eq. 1; open question Q1).

* Joint structure matrix Sigma = Sigma_t + Sigma_i + lambda I (centred covariances of the unpaired text
  and image samples, float64). lambda only shifts eigenvalues; it never changes U [INF].
* Q_U (d, r): the top-r eigenvectors of Sigma; Q_V (d, d - r): the rest. Eigenvalues are sorted in
  descending order and every eigenvector's sign is fixed so that its largest-magnitude entry is
  positive [INF] (:func:`anisogen.geometry.sorted_eigh`), so the phases are reproducible.
* r is given, or chosen as the smallest even r whose eigenvalues hold a fraction ``energy`` of tr Sigma,
  or (default) the even integer nearest d/10 (the spec's q/d = 0.1; r = 128 at d = 1280) [INF].
* Orthogonal mixing R (r, r), B = Q_U R: ``"haar"`` (default [INF], spec Q1) draws R from the Haar
  measure with a seeded generator (QR of a Gaussian matrix with the sign of diag(R) fixed);
  ``"learned"`` starts from that R and maximises the phase stability of the image sample,
  S(R) = sum_k |E e^{i theta_k}| + sum_{k<l} |E e^{i(theta_k - theta_l)}|, over R = R_0 expm(W - W^T)
  (an exact orthogonal parametrisation), then freezes R; ``"identity"`` uses R = I (no mixing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...geometry.spectrum import sorted_eigh
from ...stats import Moments
from .polar import split_blocks
from .training import BatchSampler, LoopConfig, TrainingLoop

MIXINGS = ("haar", "learned", "identity")


def joint_structure_matrix(text_moments: Moments, image_moments: Moments, ridge: float) -> np.ndarray:
    """Sigma = Sigma_t + Sigma_i + ridge * I, (d, d) float64 (spec eq. 1)."""
    if ridge <= 0:
        raise ValueError(f"ridge lambda must be > 0 (spec eq. 1), got {ridge}")
    sigma = text_moments.covariance + image_moments.covariance
    return sigma + ridge * np.eye(sigma.shape[0])


def choose_rank(eigenvalues: np.ndarray, *, rank: int | None = None, energy: float | None = None) -> int:
    """The dimension r of U: even, 2 <= r <= d.

    ``rank`` wins when given (must be even). Otherwise ``energy`` in (0, 1] picks the smallest r with
    sum_{j<=r} lambda_j >= energy * sum_j lambda_j, rounded up to even. Otherwise r = 2 round(d / 20).
    """
    d = eigenvalues.shape[0]
    top = d - (d % 2)
    if top < 2:
        raise ValueError(f"AnisoAlign needs d >= 2, got d={d}")
    if rank is not None:
        rank = int(rank)
        if rank % 2 or not 2 <= rank <= top:
            raise ValueError(f"rank r={rank} must be an even number in [2, {top}] for d={d}")
        return rank
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {energy}")
        lam = np.clip(np.sort(eigenvalues)[::-1], 0.0, None)
        cumulative = np.cumsum(lam) / lam.sum()
        r = int(np.searchsorted(cumulative, energy - 1e-12) + 1)
        return int(min(top, max(2, r + (r % 2))))
    return int(min(top, max(2, 2 * round(d / 20))))


def haar_orthogonal(r: int, seed: int) -> np.ndarray:
    """A Haar-distributed random orthogonal (r, r) float64 matrix, a pure function of ``seed``."""
    rng = np.random.default_rng([int(seed), 0x0A150])
    q, upper = np.linalg.qr(rng.standard_normal((r, r)))
    signs = np.sign(np.diag(upper))
    signs[signs == 0] = 1.0
    return q * signs


def phase_stability(coords: torch.Tensor, eps: float) -> torch.Tensor:
    """S = sum_k |mean e^{i theta_k}| + sum_{k<l} |mean e^{i(theta_k - theta_l)}| of (n, r) coordinates.

    e^{i theta} = (a + i b) / rho with rho = sqrt(a^2 + b^2 + eps), so S is differentiable in the
    coordinates. Returns a scalar tensor; the spec §6 Q1 objective for a learned R.
    """
    a, b = split_blocks(coords)
    rho = torch.sqrt(a * a + b * b + eps)
    cos, sin = a / rho, b / rho
    n = coords.shape[0]
    marginal = torch.sqrt(cos.mean(0) ** 2 + sin.mean(0) ** 2 + 1e-12).sum()
    # E[e^{i(theta_k - theta_l)}] = E[z_k conj(z_l)]: real part cc + ss, imaginary part sc - cs
    real = (cos.T @ cos + sin.T @ sin) / n
    imag = (sin.T @ cos - cos.T @ sin) / n
    modulus = torch.sqrt(real**2 + imag**2 + 1e-12)
    pairs = torch.triu(modulus, diagonal=1).sum()
    return marginal + pairs


def learn_mixing(
    image_coords: np.ndarray, initial: np.ndarray, *, loop: LoopConfig, eps: float
) -> tuple[np.ndarray, dict]:
    """Maximise :func:`phase_stability` over R = initial @ expm(W - W^T), W (r, r) starting at 0.

    Args:
        image_coords: (n, r) float unmixed image coordinates Q_U^T x (raw, uncentred images).
        initial: (r, r) orthogonal starting point R_0 (the Haar draw).
        loop: steps, batch size, learning rate, device, seed, progress, early stopping.

    Returns ``(R, history)``: the learned orthogonal (r, r) float64 matrix (orthogonal to ~1e-12 after a
    final float64 re-orthonormalisation) and ``{"mixing_stability": [...]}`` (window means of S).
    """
    device = torch.device(loop.device)
    r = initial.shape[0]
    data = torch.as_tensor(image_coords, dtype=torch.float32)
    r0 = torch.as_tensor(initial, dtype=torch.float32, device=device)
    w = torch.zeros((r, r), dtype=torch.float32, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=loop.lr)
    sampler = BatchSampler(data.shape[0], loop.batch_size, loop.seed)

    def mixed(params_w):
        return r0 @ torch.linalg.matrix_exp(params_w - params_w.T)

    def step(_):
        idx = sampler.next()
        batch = data[idx].to(device)
        loss = -phase_stability(batch @ mixed(w), eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return {"mixing_stability": -float(loss.detach())}

    val = data[: min(len(data), loop.val_size)].to(device)

    def evaluate():
        with torch.no_grad():
            return float(phase_stability(val @ mixed(w), eps))

    history = TrainingLoop(loop, "frame R", step, evaluate, key="mixing_stability", maximise=True,
                           best_state=lambda: w.detach().clone()).run()
    with torch.no_grad():
        best_w = history.pop("_best_state", None)
        final = mixed(best_w if best_w is not None else w).double().cpu().numpy()
    q, upper = np.linalg.qr(final.astype(np.float64))
    signs = np.sign(np.diag(upper))
    signs[signs == 0] = 1.0
    return q * signs, history


@dataclass
class Frame:
    """The fitted frame. All float64.

    eigenvalues (d,) of Sigma, descending; q_u (d, r) unmixed top-r eigenvectors; q_v (d, d - r) the
    complement; mixing R (r, r); ``basis`` B = Q_U R (d, r), the columns the polar blocks are read in.
    """

    eigenvalues: np.ndarray
    q_u: np.ndarray
    q_v: np.ndarray
    mixing: np.ndarray
    stored_basis: np.ndarray | None = None

    @property
    def basis(self) -> np.ndarray:
        """B = Q_U R (d, r); the stored copy when loaded from an artifact (same bits as at fit time)."""
        return self.stored_basis if self.stored_basis is not None else self.q_u @ self.mixing

    @property
    def rank(self) -> int:
        return self.q_u.shape[1]

    @property
    def blocks(self) -> int:
        return self.q_u.shape[1] // 2

    def tensors(self) -> dict[str, np.ndarray]:
        return {"frame.eigenvalues": self.eigenvalues, "frame.q_u": self.q_u, "frame.q_v": self.q_v,
                "frame.mixing": self.mixing, "frame.basis": self.basis}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> "Frame":
        return cls(tensors["frame.eigenvalues"], tensors["frame.q_u"], tensors["frame.q_v"], tensors["frame.mixing"],
                   tensors["frame.basis"])


def eigen_frame(text_moments: Moments, image_moments: Moments, *, ridge: float, rank: int | None,
                energy: float | None) -> Frame:
    """Sigma -> sorted, sign-fixed eigenvectors -> (Q_U, Q_V) with R = I (mixing is chosen afterwards)."""
    values, vectors = sorted_eigh(joint_structure_matrix(text_moments, image_moments, ridge))
    r = choose_rank(values, rank=rank, energy=energy)
    return Frame(values, vectors[:, :r].copy(), vectors[:, r:].copy(), np.eye(r))
