"""Loading CLIP models (open_clip) offline, and fingerprinting their weights.

Three kinds of sources, one function (:func:`load_clip`):

* the bundled ``toy`` model: config ``anisogen/model_configs/toy.json`` (registered with open_clip by
  ``import anisogen``) and trained weights ``anisogen/assets/toyclip.safetensors``;
* any open_clip model name with a ``pretrained`` tag (``"ViT-B-32", "openai"``), resolved by open_clip
  from its local cache (nothing is downloaded when ``HF_HUB_OFFLINE=1``), or ``hf-hub:`` / ``local-dir:``
  model names, passed through to open_clip;
* any open_clip model name with ``pretrained=<path to a local checkpoint>``: ``.safetensors`` files are
  read with safetensors, anything else with ``torch.load(weights_only=True)`` (never unpickling code).

``pretrained="random"`` builds the architecture with a seeded random initialisation (for tests and
smoke runs); for non-``toy`` names ``pretrained=None`` means the same, as in open_clip.

The fingerprint (:func:`clip_fingerprint`) is ``"{name}|{tag}|sha256={16 hex}"`` where the hash covers
every state-dict tensor (name, shape, values as float32), so it is independent of where a checkpoint file
lives and of casting between float16/bfloat16 storage and float32 compute when values are exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch

import anisogen  # noqa: F401  (registers anisogen/model_configs with open_clip)

#: Name of the bundled model (``anisogen/model_configs/toy.json``).
TOY_NAME = "toy"
#: Trained weights of the bundled model, stored as float16 safetensors (loaded into float32).
TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "toyclip.safetensors"
#: ``pretrained`` value that requests a seeded random initialisation.
RANDOM = "random"
#: Tag used in fingerprints for the bundled toy weights.
BUNDLED = "bundled"

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SCHEMAS = ("hf-hub:", "local-dir:")

logger = logging.getLogger(__name__)


def _looks_like_path(pretrained: str) -> bool:
    return (
        os.sep in pretrained
        or pretrained.startswith(".")
        or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def resolve_pretrained(name: str, pretrained: str | os.PathLike | None) -> tuple[str, str | Path | None]:
    """Classify a ``(name, pretrained)`` request.

    Returns ``(kind, source)`` with ``kind`` one of ``"random"``, ``"file"``, ``"tag"``, ``"schema"``;
    ``source`` is the checkpoint :class:`Path` for ``"file"`` and the tag string for ``"tag"``.
    Raises ``FileNotFoundError`` for a path that does not exist (including missing bundled weights).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(_SCHEMAS):
        if pretrained not in (None, RANDOM):
            raise ValueError(f"{name}: 'hf-hub:'/'local-dir:' names carry their own weights; pretrained must be None")
        return "schema", None
    if pretrained is None:
        if name == TOY_NAME:
            if not TOY_WEIGHTS.is_file():
                raise FileNotFoundError(
                    f"bundled toy CLIP weights not found at {TOY_WEIGHTS}; train them with "
                    "`python pipelines/train_toyclip.py`, or pass pretrained='random' for an untrained toy model"
                )
            return "file", TOY_WEIGHTS
        return "random", None
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"{name}: pretrained must be None, a tag or a checkpoint path, got {pretrained!r}")
    if pretrained == RANDOM:
        return "random", None
    if pretrained == BUNDLED and name == TOY_NAME:
        return resolve_pretrained(name, None)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return "file", path
    if path.is_dir():
        raise IsADirectoryError(f"{name}: pretrained={pretrained!r} is a directory; pass the checkpoint file itself")
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"{name}: checkpoint file {pretrained!r} does not exist")
    return "tag", pretrained


def _tag(name: str, pretrained) -> str:
    kind, source = resolve_pretrained(name, pretrained)
    if kind == "random":
        return RANDOM
    if kind == "schema":
        return name.split(":", 1)[0]
    if kind == "file":
        if name == TOY_NAME and Path(source).resolve() == TOY_WEIGHTS:
            return BUNDLED
        return f"file:{Path(source).name}"
    return str(source)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (hex) over the model's state dict: sorted names, shapes and values cast to float32.

    Integer/bool buffers are hashed in their own dtype. Casting between float16/bfloat16/float32 leaves
    the digest unchanged whenever the values are exactly representable.
    """
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.contiguous().reshape(-1)
        h.update(key.encode("utf-8"))
        h.update(f"{t.dtype}{tuple(value.shape)}".encode("utf-8"))
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clip_fingerprint(model: torch.nn.Module, name: str, pretrained=None) -> str:
    """``"{name}|{tag}|sha256={first 16 hex of weights_digest}"`` for a model loaded as ``(name, pretrained)``.

    ``tag`` is ``bundled`` (toy weights), ``random``, ``file:<basename>`` (local checkpoint), the open_clip
    pretrained tag, or the ``hf-hub``/``local-dir`` schema. Always recomputed from the current weights.
    """
    return f"{name}|{_tag(name, pretrained)}|sha256={weights_digest(model)[:16]}"


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
):
    """Load an open_clip model offline; returns ``(model, preprocess, tokenizer)``.

    - ``model``: float32, eval mode, on ``device``; ``model.anisogen_fingerprint`` is set (see
      :func:`clip_fingerprint`). ``model.encode_image`` takes (B, 3, H, W) float32 normalised pixels,
      ``model.encode_text`` (B, context_length) int64 token ids; both return (B, embed_dim) float32,
      not normalised.
    - ``preprocess``: open_clip's evaluation transform, ``PIL.Image`` -> (3, H, W) float32 tensor.
    - ``tokenizer``: open_clip tokenizer for ``name``, ``list[str]`` -> (B, context_length) int64.

    ``seed`` only affects ``pretrained="random"`` (and ``None`` for non-toy names): the same seed gives
    identical weights. Errors name the model and the source: a missing bundled asset or checkpoint
    raises ``FileNotFoundError``; a checkpoint whose keys/shapes do not fit the architecture raises
    ``ValueError``; an open_clip tag that is not in the local cache raises ``RuntimeError``.
    """
    import open_clip

    kind, source = resolve_pretrained(name, pretrained)
    if kind == "tag":
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source, device="cpu")
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors; unify the message
            raise RuntimeError(
                f"could not load open_clip model {name!r} with pretrained={source!r}: {exc}. "
                "Weights are never downloaded by anisogen: put them in the open_clip/HF cache, or pass "
                "pretrained=<path to a .safetensors/.pt checkpoint>."
            ) from exc
    elif kind == "schema":
        model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu")
    else:
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        with torch.random.fork_rng(devices=[]), _quiet_random_init(kind == "file"):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
        if kind == "file":
            try:
                open_clip.load_checkpoint(model, str(source), strict=True, weights_only=True)
            except RuntimeError as exc:
                raise ValueError(f"checkpoint {source} does not fit open_clip model {name!r}: {exc}") from exc
    model = model.to(device=device, dtype=torch.float32).eval()
    tokenizer = open_clip.get_tokenizer(name)
    model.anisogen_fingerprint = clip_fingerprint(model, name, pretrained)
    return model, preprocess, tokenizer


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """Hide open_clip's "initialized randomly" warning while building a model whose checkpoint (a local
    file or the bundled toy weights) is loaded right after; it would be false there."""
    if not active:
        yield
        return
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def embed_dim(model: torch.nn.Module) -> int:
    """Output dimension d of ``encode_image``/``encode_text`` for an open_clip model."""
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    with torch.no_grad():
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        dev = next(model.parameters()).device
        return int(model.encode_image(torch.zeros(1, 3, *size, device=dev)).shape[1])
