"""Unpaired image embeddings for fitting aligners: embed images with a CLIP image tower, or load
precomputed ones.

Accepted ``--images`` sources (:func:`image_source_kind`):

``npy``      a ``.npy`` file, a glob of them, or a folder that holds ``.npy`` files and no images, e.g.
             clip-retrieval's ``img_emb/img_emb_0.npy ...`` (files are read in natural order: ``_2`` before
             ``_10``) or the output folder of ``pipelines/embed_images.py`` (``img_emb.npy`` + ``img_emb.json``;
             its model fingerprint is checked against the model in use).
``folder``   a folder of image files (``.jpg .jpeg .png .webp .bmp .gif``, recursive, sorted by path).
``shards``   WebDataset tars (a ``.tar`` file, a glob, or a folder of ``.tar``): every sample with a
             ``jpg``/``jpeg``/``png``/``webp`` member is embedded.

All functions return float32 (N, d) L2-normalised rows. Images that cannot be decoded are skipped,
counted and named in a warning (never silently).
"""

from __future__ import annotations

import glob as globlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..embedding_files import natural_key as _natural_key
from ..embeddings import l2_normalize
from ..fileid import LISTING_WINDOW, ReadFn, sample_sha256

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
#: File names written by :func:`save_image_embeddings` (and ``pipelines/embed_images.py``).
EMB_FILE = "img_emb.npy"
META_FILE = "img_emb.json"
KEYS_FILE = "img_keys.txt"


def _expand(path: str | os.PathLike, exts: Sequence[str]) -> list[str]:
    p = os.fspath(path)
    if os.path.isfile(p):
        return [p]
    if os.path.isdir(p):
        return sorted((str(q) for q in Path(p).rglob("*") if q.is_file() and q.suffix.lower() in exts),
                      key=_natural_key)
    if globlib.has_magic(p):
        return sorted((q for q in globlib.glob(p, recursive=True) if os.path.isfile(q)), key=_natural_key)
    raise FileNotFoundError(f"image source {p!r} does not exist")


def image_source_kind(path: str | os.PathLike) -> str:
    """``"npy"``, ``"folder"`` or ``"shards"`` for an ``--images`` argument (``ValueError`` if none fits)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        files = [q for q in Path(p).rglob("*") if q.is_file()]
        if any(q.suffix.lower() in IMAGE_EXTS for q in files):
            return "folder"
        if any(q.suffix.lower() == ".tar" for q in files):
            return "shards"
        if any(q.suffix.lower() == ".npy" for q in files):
            return "npy"
        raise ValueError(f"{p}: folder holds no images, .tar shards or .npy embeddings")
    files = _expand(p, (".npy", ".tar") + IMAGE_EXTS)
    if not files:
        raise ValueError(f"{p!r} matches no files")
    sufs = {Path(f).suffix.lower() for f in files}
    if sufs == {".npy"}:
        return "npy"
    if sufs == {".tar"}:
        return "shards"
    if sufs <= set(IMAGE_EXTS):
        return "folder"
    raise ValueError(f"{p!r} mixes file types {sorted(sufs)}; give .npy embeddings, images or .tar shards")


def describe_image_source(path: str | os.PathLike, *, read: ReadFn | None = None) -> dict[str, Any]:
    """JSON identity of an image source for run configs, by content, not mtime (``touch`` keeps it).

    Embedding files and image shards: each file's size and sampled sha256 over the first, middle and last
    64 KiB (:func:`anisogen.fileid.sample_sha256` with :data:`~anisogen.fileid.LISTING_WINDOW`: at most 192 KiB
    read per file, so thousands of shards cost seconds, not a pass over them). Blind spot: a same-size edit
    that misses those three windows. Image folders: each file's path and size (reading every image to hash it
    would cost a pass over the folder). ``read`` is passed on to ``sample_sha256`` (default: seek and read).
    :func:`anisogen.generate.run.resolve` calls this on the main process only and shares the result.
    """
    import hashlib

    kind = image_source_kind(path)
    exts = {"npy": (".npy",), "folder": IMAGE_EXTS, "shards": (".tar",)}[kind]
    files = _expand(path, exts)
    out: dict[str, Any] = {"path": os.path.abspath(os.fspath(path)), "kind": kind, "files": len(files)}
    if kind == "folder":
        listing = [[os.path.abspath(f), os.path.getsize(f)] for f in files]
    else:
        listing = [[os.path.abspath(f), os.path.getsize(f), sample_sha256(f, window=LISTING_WINDOW, read=read)]
                   for f in files]
        out["sample_window"] = LISTING_WINDOW
    out["listing_sha256"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return out


# ------------------------------------------------------------------------------------ precomputed
def load_npy_embeddings(path: str | os.PathLike, *, model_fingerprint: str | None = None,
                        limit: int | None = None) -> np.ndarray:
    """Concatenate ``.npy`` embedding files (float16/float32, (n, d) each) into float32 (N, d), normalised.

    Files, order, sidecars and checks are those of :mod:`anisogen.embedding_files` (files of a folder in
    natural order, subfolders included). If a file's sidecar (``<stem>.json``, else the folder's
    ``img_emb.json`` / ``text_emb.json``) records a ``model`` fingerprint different from
    ``model_fingerprint``, raises ``ValueError`` (embeddings of another model live in another space).
    """
    from ..embedding_files import open_embeddings

    source = open_embeddings(path, model_fingerprint=model_fingerprint, recursive=True)
    out = source.load(limit=limit, dtype=np.float64)  # every read row is checked for NaN/Inf (file and row)
    if out.shape[0] == 0:
        raise ValueError(f"{os.fspath(path)}: no embeddings found")
    return l2_normalize(out).astype(np.float32)


# ------------------------------------------------------------------------------- embedding images
class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str], preprocess: Callable):
        self.files, self.preprocess = files, preprocess

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                return self.files[i], self.preprocess(im.convert("RGB")), None
        except Exception as exc:  # corrupt/unsupported image: reported by the caller
            return self.files[i], None, f"{type(exc).__name__}: {exc}"


class _ShardImages(torch.utils.data.IterableDataset):
    def __init__(self, urls: Sequence[str], preprocess: Callable):
        self.urls, self.preprocess = list(urls), preprocess

    def __iter__(self):
        from PIL import Image

        from ..shards.reader import iter_tar_samples

        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in urls:
            for sample in iter_tar_samples(url):
                ext = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
                key = f"{url}:{sample['__key__']}"
                if ext is None:
                    continue
                try:
                    with Image.open(io.BytesIO(sample[ext])) as im:
                        yield key, self.preprocess(im.convert("RGB")), None
                except Exception as exc:
                    yield key, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    keys = [k for k, x, _ in items if x is not None]
    xs = [x for _, x, _ in items if x is not None]
    bad = [(k, e) for k, x, e in items if x is None]
    return keys, (torch.stack(xs) if xs else None), bad


def embed_images(path: str | os.PathLike, model, preprocess: Callable, *, device: str | torch.device = "cpu",
                 batch_size: int = 64, num_workers: int = 0, limit: int | None = None,
                 precision: str = "auto", progress: bool = False) -> tuple[np.ndarray, list[str], list]:
    """Embed an image folder or image shards with ``model.encode_image``.

    Returns ``(emb float32 (N, d) L2-normalised, keys, failures)`` where keys are file paths (folder) or
    ``url:key`` (shards) in reading order and failures lists ``(key, error)`` of undecodable images.
    ``precision``: ``auto`` = bf16 autocast on CUDA, fp32 on CPU.
    """
    kind = image_source_kind(path)
    if kind == "npy":
        raise ValueError(f"{path}: holds precomputed embeddings; use load_npy_embeddings")
    if kind == "folder":
        files = _expand(path, IMAGE_EXTS)
        ds: torch.utils.data.Dataset = _ImageFiles(files, preprocess)
        total = len(files) if limit is None else min(limit, len(files))
    else:
        ds = _ShardImages(_expand(path, (".tar",)), preprocess)
        total = limit
    device = torch.device(device)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    model = model.to(device).eval()
    outs, keys, failures = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="embed images")
    with torch.inference_mode():
        for bkeys, x, bad in loader:
            failures.extend(bad)
            if x is not None:
                if limit is not None and len(keys) + len(bkeys) > limit:
                    cut = limit - len(keys)
                    bkeys, x = bkeys[:cut], x[:cut]
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    feats = model.encode_image(x.to(device))
                outs.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
                keys.extend(bkeys)
            if bar is not None:
                bar.update(len(bkeys) + len(bad))
            if limit is not None and len(keys) >= limit:
                break
    if bar is not None:
        bar.close()
    if failures:
        shown = "; ".join(f"{k} ({e})" for k, e in failures[:5])
        logger.warning(
            "skipped %d undecodable image(s): %s%s", len(failures), shown, " ..." if len(failures) > 5 else ""
        )
    if not outs:
        raise ValueError(f"{path}: no decodable images found ({len(failures)} failed)")
    return np.concatenate(outs).astype(np.float32), keys, failures


def load_image_embeddings(path: str | os.PathLike, *, model=None, preprocess: Callable | None = None,
                          model_fingerprint: str | None = None, device: str | torch.device = "cpu",
                          batch_size: int = 64, num_workers: int = 0, limit: int | None = None,
                          progress: bool = False) -> np.ndarray:
    """Image embeddings float32 (N, d), L2-normalised, from any accepted source (see module docstring).

    ``model``/``preprocess`` are needed only for image folders and shards.
    """
    if image_source_kind(path) == "npy":
        return load_npy_embeddings(path, model_fingerprint=model_fingerprint, limit=limit)
    if model is None or preprocess is None:
        raise ValueError(f"{path}: embedding images needs the CLIP model and its preprocess transform")
    emb, _, _ = embed_images(path, model, preprocess, device=device, batch_size=batch_size,
                             num_workers=num_workers, limit=limit, progress=progress)
    return emb


def save_image_embeddings(out_dir: str | os.PathLike, emb: np.ndarray, keys: Sequence[str], *,
                          meta: dict[str, Any], dtype: str = "fp32") -> Path:
    """Write ``img_emb.npy`` (float32 or float16 (N, d)), ``img_keys.txt`` and ``img_emb.json`` atomically."""
    from ..shards.writer import write_embedding_set

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16 for image embeddings, got {dtype!r}")
    arr = np.asarray(emb, dtype=np.float16 if dtype == "fp16" else np.float32)
    return write_embedding_set(out_dir, emb_file=EMB_FILE, emb=arr, keys_file=KEYS_FILE, keys=keys,
                               meta_file=META_FILE, meta={**meta, "dtype": dtype})
