"""The aligner interface shared by every method, the registry, and artifact save/load.

An aligner maps L2-normalised CLIP text embeddings (N, d) to substitute image embeddings (N, d). It is
fitted on **unpaired** text and image samples and then applied deterministically, row by row:
``transform`` does not depend on how rows are batched.

Fitting reads its inputs as *sources* (see :func:`anisogen.embeddings.iter_chunks`): an array, a list of
chunks, or a callable returning an iterable of chunks. First and second moments are accumulated in
float64 chunk by chunk (:class:`anisogen.stats.Moments`), so closed-form aligners never hold the whole
sample in memory, and a ``reducer`` can sum the moments across processes.

Artifacts are directories::

    config.json          name, params, dim, seed, anisogen version, model fingerprint, fit counts
    tensors.safetensors  every fitted tensor (float64 statistics, network weights)
    history.json         loss curves of trained stages (may be empty)

No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file

from .. import __version__
from ..embeddings import check_embeddings, iter_chunks, l2_normalize
from ..stats import MeanAccumulator, Moments, Reducer

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .device import DeviceTransform

CONFIG_NAME = "config.json"
TENSORS_NAME = "tensors.safetensors"
HISTORY_NAME = "history.json"

#: name -> Aligner subclass. Filled by :func:`register_aligner`.
ALIGNERS: dict[str, type["Aligner"]] = {}


def register_aligner(cls: type["Aligner"]) -> type["Aligner"]:
    """Class decorator adding ``cls`` to :data:`ALIGNERS` under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if cls.name in ALIGNERS and ALIGNERS[cls.name] is not cls:
        raise ValueError(f"aligner name {cls.name!r} is already registered by {ALIGNERS[cls.name].__name__}")
    ALIGNERS[cls.name] = cls
    return cls


@dataclass
class FitContext:
    """Everything a subclass may use while fitting.

    ``text``/``image`` are re-iterable sources of (n, d) float chunks (already validated rows are
    re-validated on each read); ``text_moments``/``image_moments`` are the reduced float64 moments.
    """

    text: Any
    image: Any
    text_moments: Moments
    image_moments: Moments
    seed: int
    normalize: bool
    reducer: Reducer | None
    device: str
    progress: bool
    chunk_size: int

    def text_chunks(self):
        """Yield validated float64 text chunks (L2-normalised when ``normalize``)."""
        yield from _validated_chunks(self.text, "text", self.text_moments.dim, self.normalize, self.chunk_size)

    def image_chunks(self):
        """Yield validated float64 image chunks (L2-normalised when ``normalize``)."""
        yield from _validated_chunks(self.image, "image", self.image_moments.dim, self.normalize, self.chunk_size)


def _validated_chunks(source, name: str, dim: int, normalize: bool, chunk_size: int):
    seen = 0
    for chunk in iter_chunks(source, chunk_size):
        yield check_embeddings(chunk, name=name, dim=dim, normalize=normalize, row_offset=seen)
        seen += len(chunk)


class Aligner(ABC):
    """Base class: fit on unpaired text/image embeddings, transform text into substitutes.

    Subclasses set ``name`` and ``default_params`` and implement :meth:`_fit` and :meth:`_map`.
    Setting ``centroid_calibration = True`` adds the final calibration step shared by ReAlign and
    AnisoAlign: after fitting, mu_hat = mean over the *fit texts* of Norm(_map(y)) is stored, and every
    later transform returns Norm(Norm(_map(y)) - mu_hat + mu_image).
    """

    name: ClassVar[str] = ""
    default_params: ClassVar[dict[str, Any]] = {}
    centroid_calibration: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.default_params)
        if unknown:
            raise ValueError(
                f"aligner {self.name!r} got unknown parameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.default_params)}"
            )
        self.params: dict[str, Any] = {**self.default_params, **params}
        self.dim: int | None = None
        self.seed: int = 0
        self.model_fingerprint: str | None = None
        self.fit_counts: dict[str, int] = {}
        self.history: dict[str, list[float]] = {}
        self.tensors: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------------ fitting
    def fit(
        self,
        text,
        image,
        *,
        seed: int = 0,
        model_fingerprint: str | None = None,
        normalize: bool = False,
        reducer: Reducer | None = None,
        device: str | None = None,
        progress: bool = False,
        chunk_size: int = 65536,
    ) -> "Aligner":
        """Fit on unpaired ``text`` and ``image`` sources of (n, d) L2-normalised embeddings.

        ``reducer`` sums float64 vectors across processes (all-reduce); with it, every rank holding a
        part of the fit sample ends with the same statistics. Returns ``self``.
        """
        self._check_fit_options(device=device or "cpu", reducer=reducer)
        text_m = Moments.from_source(text, name="text", normalize=normalize, chunk_size=chunk_size).reduce(reducer)
        image_m = Moments.from_source(image, name="image", normalize=normalize, chunk_size=chunk_size).reduce(reducer)
        if text_m.dim != image_m.dim:
            raise ValueError(f"dimension mismatch between inputs: text d={text_m.dim}, image d={image_m.dim}")
        self.dim = text_m.dim
        self.seed = int(seed)
        self.model_fingerprint = model_fingerprint
        self.fit_counts = {"text": text_m.count, "image": image_m.count}
        self.tensors = {}
        self.history = {}
        ctx = FitContext(
            text=text, image=image, text_moments=text_m, image_moments=image_m, seed=self.seed,
            normalize=normalize, reducer=reducer, device=device or "cpu", progress=progress, chunk_size=chunk_size,
        )
        self._fit(ctx)
        if self.centroid_calibration:
            self._fit_centroid_calibration(ctx)
        return self

    def _check_fit_options(self, *, device: str, reducer: Reducer | None) -> None:
        """Refuse unusable fit options before any data is read (closed-form aligners accept all)."""

    def _fit_centroid_calibration(self, ctx: FitContext) -> None:
        """Store ``mu_image`` and ``mu_hat`` = mean of the uncalibrated outputs over the fit texts."""
        acc = MeanAccumulator(self.dim)
        for chunk in ctx.text_chunks():
            acc.update(l2_normalize(self._map(chunk)))
        self.tensors.setdefault("mu_image", ctx.image_moments.mean.copy())
        self.tensors["mu_hat"] = acc.reduce(ctx.reducer).mean

    @abstractmethod
    def _fit(self, ctx: FitContext) -> None:
        """Compute the fitted tensors into ``self.tensors`` (and curves into ``self.history``)."""

    @abstractmethod
    def _map(self, text: np.ndarray) -> np.ndarray:
        """Map validated float64 text (n, d) to float64 (n, d) substitutes before the final normalisation.

        Must be row-wise: each output row depends only on its input row and the fitted state.
        """

    # ---------------------------------------------------------------------------- applying
    def transform(self, text, *, normalize: bool = False, batch_size: int = 65536) -> np.ndarray:
        """Substitute image embeddings for ``text`` (N, d): float32, unit norm, shape (N, d)."""
        self._require_fitted()
        text = np.asarray(text)
        outputs = []
        for start in range(0, max(len(text), 1), batch_size):
            chunk = check_embeddings(
                text[start : start + batch_size], name="text", dim=self.dim, normalize=normalize,
                min_rows=0, row_offset=start,
            )
            if len(chunk) == 0:
                break
            outputs.append(self._finish(self._map(chunk)))
        if not outputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32)

    def _finish(self, mapped: np.ndarray) -> np.ndarray:
        out = l2_normalize(mapped)
        if self.centroid_calibration:
            out = l2_normalize(out - self.tensors["mu_hat"] + self.tensors["mu_image"])
        return out

    # ------------------------------------------------------------------- applying on a device
    def device_transform(self, device="cpu", *, block: int | None = None) -> "DeviceTransform":
        """This aligner's transform as float32 torch on ``device`` (:class:`anisogen.align.device.DeviceTransform`).

        The fitted tensors are moved there once; calling the result maps (n, d) float32 unit text embeddings
        already on ``device`` to (n, d) float32 unit substitutes on ``device``, in fixed-shape zero-padded
        blocks of ``block`` rows (default :meth:`_default_device_block`), so that a row's bits do not depend
        on its batch. Each row agrees with :meth:`transform` (the float64 reference) to a cosine >= 1 - 1e-6.
        """
        from .device import DeviceTransform

        return DeviceTransform(self, device, block=block)

    def _default_device_block(self) -> int:
        """Rows per fixed-shape block of :meth:`device_transform` when none is given."""
        from .device import DEFAULT_BLOCK

        return DEFAULT_BLOCK

    def _device_tensors(self, device: "torch.device") -> dict[str, "torch.Tensor"]:
        """The fitted state that :meth:`_map_torch` reads, as float32 tensors on ``device`` (built once).

        The default moves every float64 (d,) vector of ``self.tensors`` (``mu_text``, ``mu_image``, ...);
        aligners needing more override it.
        """
        return {key: _to_device32(value, device) for key, value in self.tensors.items()
                if np.ndim(value) == 1 and np.shape(value)[0] == self.dim}

    def _map_torch(self, text: "torch.Tensor", tensors: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The float32 torch mirror of :meth:`_map` on one (block, d) block on the device.

        Must be row-wise (zero rows pad the last block) and must not leave the device except where
        documented (C3's noise). The final normalisation and calibration are the caller's.
        """
        raise NotImplementedError(f"aligner {self.name!r} has no device path")

    def transform_image(self, image, *, normalize: bool = False) -> np.ndarray:
        """Image-side preprocessing at inference (N, d) -> float32 unit (N, d). Identity by default."""
        self._require_fitted()
        return check_embeddings(image, name="image", dim=self.dim, normalize=normalize).astype(np.float32)

    def _require_fitted(self) -> None:
        if self.dim is None:
            raise RuntimeError(f"aligner {self.name!r} is not fitted: call fit() or load_aligner() first")

    # ------------------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable description written to ``config.json``."""
        return {
            "name": self.name,
            "params": self.params,
            "dim": self.dim,
            "seed": self.seed,
            "anisogen_version": __version__,
            "model_fingerprint": self.model_fingerprint,
            "fit_counts": self.fit_counts,
            "tensors": sorted(self.tensors),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the artifact directory (config.json, tensors.safetensors, history.json)."""
        self._require_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        save_file(tensors, str(out / TENSORS_NAME), metadata={"aligner": self.name})
        (out / HISTORY_NAME).write_text(json.dumps(self.history, indent=1))
        # config last: its presence marks a complete artifact
        tmp = out / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.config(), indent=2, sort_keys=True))
        os.replace(tmp, out / CONFIG_NAME)
        return out

    @classmethod
    def from_config_params(cls, params: dict[str, Any]) -> "Aligner":
        """The aligner described by an artifact's stored ``params`` (subclasses fill parameters added later)."""
        return cls(**params)

    def _load_state(self, config: dict[str, Any], tensors: dict[str, np.ndarray], history: dict) -> None:
        """Restore fitted state; subclasses holding networks rebuild them here (call super first)."""
        self.dim = int(config["dim"])
        self.seed = int(config.get("seed", 0))
        self.model_fingerprint = config.get("model_fingerprint")
        self.fit_counts = dict(config.get("fit_counts", {}))
        self.tensors = dict(tensors)
        self.history = dict(history)


def _to_device32(value, device) -> "torch.Tensor":
    """A float64 NumPy array as a contiguous float32 tensor on ``device`` (rounded once, from float64)."""
    import torch

    return torch.as_tensor(np.asarray(value, dtype=np.float64)).to(dtype=torch.float32, device=device).contiguous()


def fit_aligner(
    name: str,
    *,
    text,
    image,
    seed: int = 0,
    model_fingerprint: str | None = None,
    normalize: bool = False,
    reducer: Reducer | None = None,
    device: str | None = None,
    progress: bool = False,
    **params: Any,
) -> Aligner:
    """Build the registered aligner ``name`` with ``params`` and fit it on unpaired text and image."""
    return get_aligner_class(name)(**params).fit(
        text, image, seed=seed, model_fingerprint=model_fingerprint, normalize=normalize,
        reducer=reducer, device=device, progress=progress,
    )


def get_aligner_class(name: str) -> type[Aligner]:
    """Look up ``name`` in :data:`ALIGNERS` with a clear error listing the known names."""
    try:
        return ALIGNERS[name]
    except KeyError:
        raise ValueError(f"unknown aligner {name!r}; registered: {sorted(ALIGNERS)}") from None


def load_aligner(
    directory: str | os.PathLike, *, model_fingerprint: str | None = None, dim: int | None = None
) -> Aligner:
    """Load an artifact written by :meth:`Aligner.save`.

    With ``model_fingerprint``, the artifact must have been fitted for exactly that CLIP model; with
    ``dim``, for that embedding dimension. Either mismatch raises ``ValueError``.
    """
    path = Path(directory)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: not an aligner artifact (no {CONFIG_NAME})")
    config = json.loads(config_path.read_text())
    if dim is not None and int(config["dim"]) != int(dim):
        raise ValueError(f"{path}: aligner was fitted for d={config['dim']}, but the embeddings have d={dim}")
    stored = config.get("model_fingerprint")
    if model_fingerprint is not None and stored != model_fingerprint:
        raise ValueError(
            f"{path}: aligner was fitted for CLIP model {stored!r}, not {model_fingerprint!r}; "
            "refit the aligner for this model"
        )
    cls = get_aligner_class(config["name"])
    tensors = load_file(str(path / TENSORS_NAME))
    history_path = path / HISTORY_NAME
    history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    try:
        aligner = cls.from_config_params(dict(config.get("params", {})))
        aligner._load_state(config, tensors, history)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{path}: cannot load this {config['name']!r} artifact (written by anisogen "
            f"{config.get('anisogen_version', '?')}): {exc}; refit it with this version"
        ) from None
    return aligner
