"""Encoding toy-world data with a CLIP model, and the quality metrics of the toy CLIP.

Metrics (all on held-out scenes, never seen in training):

* zero-shot colour / shape accuracy on one-object scenes, prompting with :data:`COLOR_PROMPT`
  ("a photo of a {colour} object") and :data:`SHAPE_PROMPT` ("a photo of a {shape}");
* image -> caption R@1 among ``n`` held-out pairs: a hit when the top caption *describes* the query
  scene (:func:`~anisogen.toyworld.text.describes_matrix`), e.g. its own caption or one that makes only
  true claims about it; also the strict rate (own caption retrieved) and text -> image R@1;
* ``G_mu`` and ``A_r`` of :func:`anisogen.geometry.gap_report` on paired held-out embeddings.

The held-out evaluation set is deterministic in ``seed``: ``sample_scenes(n, "heldout", seed)`` with the
caption of style ``STYLES[i % 7]`` for scene ``i`` (every style equally often).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .render import render_array
from .scenes import COLORS, SHAPES, Scene, sample_scenes
from .text import COLOR_PROMPT, SHAPE_PROMPT, STYLES, Caption, caption, describes_matrix

#: open_clip's default (OpenAI) normalisation, used by the toy model's preprocess.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def pixels_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] and normalised with MEAN/STD.

    Equal to the toy model's ``preprocess`` for images already at the model resolution (64 x 64).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _model_image_size(model) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", None)
    if size is None:
        return (-1, -1)
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


@torch.no_grad()
def encode_pixels(model, images: np.ndarray, *, batch_size: int = 512, preprocess=None) -> np.ndarray:
    """L2-normalised image embeddings, float32 (N, d), of uint8 (N, H, W, 3) renders.

    Renders at the model's input size take the fast path (:func:`pixels_to_tensor`, identical to the
    toy preprocess); otherwise ``preprocess`` (the transform returned by ``load_clip``) is applied to
    each image, and is required.
    """
    from PIL import Image

    fast = tuple(images.shape[1:3]) == _model_image_size(model)
    if not fast and preprocess is None:
        raise ValueError(f"images are {images.shape[1:3]} but the model expects {_model_image_size(model)}; "
                         "pass preprocess=")
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        chunk = images[lo:lo + batch_size]
        x = pixels_to_tensor(chunk) if fast else torch.stack([preprocess(Image.fromarray(im)) for im in chunk])
        x = x.to(_device(model))
        out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def encode_text_trimmed(model, tokens: torch.Tensor, *, bucket: int = 32) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed in length buckets trimmed to their longest sequence.

    Exact for open_clip's causal, EOT-pooled text towers (real lengths come from the EOT position; see
    :mod:`anisogen.encode.text`); other towers fall back to ``encode_text``. Differentiable, so the toy
    CLIP trains through it. (B, L) int64 ids -> (B, d) float32.
    """
    from ..encode.text import bucket_batches, text_tower, token_lengths, trimmed_forward

    tower = text_tower(model)
    if tower is None:
        return model.encode_text(tokens)
    lengths = token_lengths(tokens.cpu())
    batches = bucket_batches(lengths, bucket)
    pieces = [trimmed_forward(tower, tokens[torch.as_tensor(idx), :int(lengths[idx].max())]) for idx in batches]
    order = torch.as_tensor(np.concatenate(batches), device=tokens.device)
    result = torch.empty(len(tokens), pieces[0].shape[1], dtype=pieces[0].dtype, device=pieces[0].device)
    return result.index_put((order,), torch.cat(pieces))


@torch.no_grad()
def encode_captions(model, tokenizer, texts: Sequence[str], *, batch_size: int = 1024) -> np.ndarray:
    """L2-normalised text embeddings, float32 (N, d) (length-bucketed, see :func:`encode_text_trimmed`)."""
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[lo:lo + batch_size])).to(_device(model))
        out.append(torch.nn.functional.normalize(encode_text_trimmed(model, tokens).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def heldout_pairs(n: int, seed: int = 0, split: str = "heldout") -> tuple[list[Scene], list[Caption]]:
    """``n`` held-out scenes and one caption each (style ``STYLES[i % 7]``), deterministic in ``seed``."""
    scenes = sample_scenes(n, split, seed)
    caps = [caption(s, STYLES[i % len(STYLES)], seed=seed) for i, s in enumerate(scenes)]
    return scenes, caps


def zero_shot_accuracy(model, tokenizer, images: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                       template: str) -> float:
    """Fraction of images whose most similar prompt ``template.format(class)`` is the true label."""
    img = encode_pixels(model, images)
    txt = encode_captions(model, tokenizer, [template.format(c) for c in classes])
    pred = np.asarray(classes)[np.argmax(img @ txt.T, axis=1)]
    return float(np.mean(pred == np.asarray(labels)))


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, hits: np.ndarray) -> dict:
    """R@1 for paired rows given ``hits`` (C, S) bool (caption c describes scene s).

    ``i2t_r1``: fraction of images whose top caption describes them; ``i2t_r1_strict``: whose top
    caption is their own; ``t2i_r1``: fraction of captions whose top image they describe.
    """
    sim = image_emb @ text_emb.T  # (S, C)
    top_t = np.argmax(sim, axis=1)
    top_i = np.argmax(sim, axis=0)
    idx = np.arange(len(image_emb))
    return {
        "i2t_r1": float(np.mean(hits[top_t, idx])),
        "i2t_r1_strict": float(np.mean(top_t == idx)),
        "t2i_r1": float(np.mean(hits[np.arange(len(text_emb)), top_i])),
    }


@dataclass
class EvalSet:
    """Rendered held-out evaluation data (see module doc)."""

    zs_images: np.ndarray
    zs_colors: list[str]
    zs_shapes: list[str]
    pair_images: np.ndarray
    pair_texts: list[str]
    pair_hits: np.ndarray  # (n_retrieval, n_retrieval) bool
    n_retrieval: int


def build_eval_set(*, seed: int = 0, n_zero_shot: int = 1000, n_pairs: int = 5000, n_retrieval: int = 1000,
                   split: str = "heldout") -> EvalSet:
    """Render the evaluation data once (one-object scenes for zero-shot, ``n_pairs`` paired scenes)."""
    if n_retrieval > n_pairs:
        raise ValueError(f"n_retrieval={n_retrieval} must be <= n_pairs={n_pairs}")
    zs = sample_scenes(n_zero_shot, split, seed, n_objects=1)
    scenes, caps = heldout_pairs(n_pairs, seed, split)
    hits = describes_matrix([c.claim for c in caps[:n_retrieval]], scenes[:n_retrieval])
    return EvalSet(
        zs_images=render_array(zs), zs_colors=[s.objects[0].color for s in zs],
        zs_shapes=[s.objects[0].shape for s in zs], pair_images=render_array(scenes),
        pair_texts=[c.text for c in caps], pair_hits=hits, n_retrieval=n_retrieval,
    )


def evaluate_clip(model, tokenizer, data: EvalSet, *, gap: bool = True) -> dict:
    """All quality metrics of ``model`` on ``data``: zero-shot, retrieval and (optionally) gap_report."""
    metrics = {
        "zero_shot_color": zero_shot_accuracy(model, tokenizer, data.zs_images, data.zs_colors, COLORS, COLOR_PROMPT),
        "zero_shot_shape": zero_shot_accuracy(model, tokenizer, data.zs_images, data.zs_shapes, SHAPES, SHAPE_PROMPT),
    }
    img = encode_pixels(model, data.pair_images)
    txt = encode_captions(model, tokenizer, data.pair_texts)
    n = data.n_retrieval
    metrics.update(retrieval_metrics(img[:n], txt[:n], data.pair_hits))
    if gap:
        from ..geometry import gap_report

        rep = gap_report(image=img.astype(np.float64), text=txt.astype(np.float64), normalize=True)
        metrics.update({k: float(rep[k]) for k in ("G_mu", "A_r", "D_center", "R_res", "d_eff_ratio", "C_lambda")})
        metrics["n_pairs"] = int(len(img))
    metrics["logit_scale"] = float(model.logit_scale.exp().item())
    return metrics
