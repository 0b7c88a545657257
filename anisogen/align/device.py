"""Apply a fitted aligner on the encoder's device: float32 torch, fixed-shape blocks, no host round trip.

:meth:`anisogen.align.Aligner.transform` is the float64 NumPy *reference*. :class:`DeviceTransform` (built by
:meth:`Aligner.device_transform`) is the production path: it holds the fitted state as float32 tensors on
one device, built once, and maps float32 (n, d) L2-normalised text embeddings that are already on that
device to float32 unit-norm (n, d) substitutes on the same device::

    dt = aligner.device_transform("cuda")                    # built once
    emb = torch.nn.functional.normalize(clip.encode_text(tokens).float(), dim=-1)
    z = dt(emb)                                               # (n, d) float32 unit rows, still on the GPU

Calls run under ``torch.inference_mode()``.

Contract:

* **Precision.** Everything on the device is float32 (fitting stays float64). Every output row agrees with
  ``transform`` (float64) to a per-row cosine >= 1 - 1e-6 (``tests/test_align_device.py``). The exception
  is AnisoAlign on rows with a U block of norm below ~1e-6 (typical: 0.1), where the phase is the
  direction of a vector made of rounding error in both paths (docs/ANISOALIGN.md).
* **Batch independence.** Rows are copied into one fixed-shape, zero-padded staging block of ``block`` rows
  (default 1024, or AnisoAlign's ``transform_block``) and every kernel sees exactly that shape, so a row's
  output bits do not depend on its batch-mates, its position, or how the caller batches: on a given device,
  library build and thread count. Bits may differ between CPU and CUDA (and between library versions).
* **Validation.** ``x`` must be a float32 (n, d) tensor on the transform's device, else ``ValueError``.
  Rows must be finite with unit L2 norm within 2e-3 (as ``check_embeddings``); ``normalize=True``
  L2-normalises first. A row that is non-finite, not unit norm, or that maps to a non-finite substitute
  (a degenerate zero-norm map) raises ``ValueError`` naming the first such row: nothing is silently
  emitted as NaN. This costs one small device reduction and one host synchronisation per call;
  :meth:`DeviceTransform.map_async` skips the synchronisation and returns the per-row flags instead, for a
  caller that checks them later (the generator checks them after its one device-to-host copy).
* ``n = 0`` returns an empty (0, d) tensor.
* **CUDA.** TF32 matmuls would void the precision contract; a call warns once when they are enabled
  (``torch.set_float32_matmul_precision`` other than ``"highest"``, or ``allow_tf32``).
* **C3** is the one aligner with a host step: its per-row noise is keyed by a blake2b hash of each row's
  float64 bytes and drawn with NumPy's PCG64 (:func:`anisogen.align.c3.row_noise`; changing it would change
  published baseline numbers), so each block is copied to the host, the noise is drawn there and added back
  on the device. C3 is a baseline, not a production path. (Its noise matches ``transform`` for the same
  float32 rows.)

Aligners take part by implementing ``_device_tensors(device)`` (their fitted tensors, float32, on the device)
and ``_map_torch(x, tensors)`` (the float32 mirror of ``_map`` on one block); the final normalisation and
the centroid calibration are done here, mirroring ``Aligner._finish``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..embeddings import NORM_ATOL

if TYPE_CHECKING:  # pragma: no cover
    from .base import Aligner

#: rows per fixed-shape block unless the aligner says otherwise
DEFAULT_BLOCK = 1024


def resolve_device(device) -> torch.device:
    """``device`` as a torch device with an explicit CUDA index (``"cuda"`` -> ``cuda:<current>``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA "
                             "device(s) exist")
    return dev


def _warn_if_tf32() -> None:
    """TF32 matmuls (10-bit mantissa) void the 1 - 1e-6 agreement: say so, once per process."""
    global _TF32_WARNED
    if _TF32_WARNED:
        return
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32:
        _TF32_WARNED = True
        warnings.warn("TF32 matmuls are enabled (torch.set_float32_matmul_precision / allow_tf32): the device "
                      "transform's float32 agreement with the reference (cosine >= 1 - 1e-6) does not hold; "
                      "set torch.set_float32_matmul_precision('highest')", RuntimeWarning, stacklevel=3)


_TF32_WARNED = False


class DeviceTransform:
    """A fitted aligner's transform as float32 torch on one device (see the module docstring).

    Attributes: ``name`` (the aligner's), ``dim`` d, ``device``, ``block`` (rows per fixed-shape block),
    ``tensors`` (the float32 device tensors the aligner's ``_map_torch`` reads). The state is a snapshot: a
    transform built before the aligner is refitted keeps the old map. Calls do not change torch's thread
    settings (AnisoAlign's ``threads`` parameter applies to ``fit`` and ``transform`` only).
    """

    def __init__(self, aligner: "Aligner", device="cpu", *, block: int | None = None) -> None:
        from .base import Aligner

        aligner._require_fitted()
        if type(aligner)._map_torch is Aligner._map_torch:
            raise NotImplementedError(f"aligner {aligner.name!r} has no device path (_map_torch)")
        block = aligner._default_device_block() if block is None else block
        if int(block) != block or int(block) < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        self.aligner = aligner
        self.name = aligner.name
        self.dim = int(aligner.dim)
        self.block = int(block)
        self.device = resolve_device(device)
        with torch.inference_mode():
            self.tensors: dict[str, torch.Tensor] = aligner._device_tensors(self.device)
            # Norm(Norm(e') - mu_hat + mu_i): the shift mu_i - mu_hat, taken in float64, used in float32
            self._shift = (self._f32(aligner.tensors["mu_image"] - aligner.tensors["mu_hat"])
                           if aligner.centroid_calibration else None)

    def __repr__(self) -> str:
        return f"DeviceTransform({self.name!r}, d={self.dim}, device={str(self.device)!r}, block={self.block})"

    def _f32(self, array) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float64).to(dtype=torch.float32, device=self.device).contiguous()

    # ------------------------------------------------------------------------------ applying
    def _check(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: expected a torch.Tensor of shape (n, {self.dim}), got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{self.name}: expected shape (n, {self.dim}), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"{self.name}: expected float32 embeddings, got {x.dtype} (convert with x.float())")
        if x.device != self.device:
            raise ValueError(f"{self.name}: the input is on {x.device}, this transform on {self.device} "
                             f"(build one with aligner.device_transform({str(x.device)!r}))")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """(n, d) float32 unit text embeddings on ``device`` -> (n, d) float32 unit substitutes there."""
        out, bad_in, bad_out, norms = self._apply(x, normalize)
        if bool((bad_in | bad_out).any()):  # the one host synchronisation of a call
            self._raise_bad(bad_in, bad_out, norms, normalize)
        return out

    @torch.inference_mode()
    def map_async(self, x: torch.Tensor, *, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Like calling the transform, without the host synchronisation: returns ``(out, bad)``, ``bad`` a
        (n,) bool device tensor marking the rows the call would have refused. The caller must check it
        (the generator copies it to the host with the substitutes and refuses the task there)."""
        out, bad_in, bad_out, _ = self._apply(x, normalize)
        return out, bad_in | bad_out

    def _apply(self, x: torch.Tensor, normalize: bool):
        self._check(x)
        if self.device.type == "cuda":
            _warn_if_tf32()
        n, d = x.shape
        if n == 0:
            empty = torch.zeros((0,), dtype=torch.bool, device=self.device)
            return torch.empty((0, d), dtype=torch.float32, device=self.device), empty, empty, empty
        norms = torch.linalg.vector_norm(x, dim=1)
        if normalize:
            x = x / norms[:, None]
            bad_in = ~(norms > 1e-12) | ~torch.isfinite(norms)
        else:
            bad_in = ~((norms - 1.0).abs() <= NORM_ATOL)  # NaN and Inf compare False: flagged too
        out = torch.empty((n, d), dtype=torch.float32, device=self.device)
        out_norms = torch.empty((n,), dtype=torch.float32, device=self.device)
        stage = torch.empty((self.block, d), dtype=torch.float32, device=self.device)
        for start in range(0, n, self.block):
            k = min(self.block, n - start)
            stage[:k].copy_(x[start : start + k])  # always staged: same shape, same alignment, contiguous
            if k < self.block:
                stage[k:].zero_()
            z, norm = self._finish(self.aligner._map_torch(stage, self.tensors))
            out[start : start + k] = z[:k]
            out_norms[start : start + k] = norm[:k]
        # the last normaliser of a row is finite and > 0 exactly when its output row is finite
        bad_out = ~((out_norms > 0) & (out_norms < float("inf")))
        return out, bad_in, bad_out, norms

    def _finish(self, mapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm(e'), then Norm(Norm(e') - mu_hat + mu_i) with centroid calibration (``Aligner._finish``).

        Returns the rows and the last normaliser of each row (the finiteness check reads it)."""
        norm = torch.linalg.vector_norm(mapped, dim=1, keepdim=True)
        out = mapped / norm
        if self._shift is not None:
            out += self._shift
            norm = torch.linalg.vector_norm(out, dim=1, keepdim=True)
            out /= norm
        return out, norm[:, 0]

    def _raise_bad(self, bad_in, bad_out, norms, normalize: bool):
        if bool(bad_in.any()):
            row = int(torch.nonzero(bad_in)[0, 0])
            norm = float(norms[row])
            if not torch.isfinite(norms[row]):
                raise ValueError(f"{self.name}: text row {row} contains NaN or Inf")
            if normalize:
                raise ValueError(f"{self.name}: text row {row} has zero norm and cannot be L2-normalised")
            raise ValueError(f"{self.name}: text row {row} has L2 norm {norm:.6f}, not unit norm within "
                             f"atol={NORM_ATOL}; L2-normalise the embeddings or pass normalize=True")
        row = int(torch.nonzero(bad_out)[0, 0])
        raise ValueError(f"{self.name}: text row {row} maps to a non-finite substitute (its mapped vector has "
                         "zero norm)")
