"""Encoders: CLIP loading and fingerprinting (``clip``); text/image encoding pipelines live beside it.

``load_clip(name, pretrained=None, device="cpu")`` -> ``(model, preprocess, tokenizer)`` and
``clip_fingerprint(model, name, pretrained)`` -> ``str``; see :mod:`anisogen.encode.clip`.
"""

from .clip import BUNDLED, RANDOM, TOY_NAME, TOY_WEIGHTS, clip_fingerprint, embed_dim, load_clip, weights_digest

__all__ = [
    "load_clip", "clip_fingerprint", "weights_digest", "embed_dim",
    "TOY_NAME", "TOY_WEIGHTS", "RANDOM", "BUNDLED",
]
