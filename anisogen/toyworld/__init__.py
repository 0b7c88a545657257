"""The toy world: a small, real multimodal world shipped with anisogen.

Procedurally rendered scenes (1-3 coloured shapes on a background, 64 x 64 px), natural-language
captions with structured claims, instruction conversations (with POPE-style absent-object probes), and
a small CLIP trained on them (``anisogen.encode.load_clip("toy")``).

Public API: :func:`sample_scenes`, :func:`render`, :func:`captions`, :func:`instructions`,
:data:`COLORS`, :data:`SHAPES` (plus :data:`SIZES`, :data:`REGIONS`, :data:`BACKGROUNDS`).
"""

from .instructions import IMAGE_TOKEN, instruction_records, instructions
from .render import IMAGE_SIZE, render, render_array
from .scenes import (
    BACKGROUNDS, COLORS, HELDOUT_COMBOS, REGIONS, SHAPES, SIZES, SPLITS, Scene, SceneObject, content_split,
    sample_scenes,
)
from .text import (
    COLOR_PROMPT, SHAPE_PROMPT, STYLES, Caption, Claim, ObjectClaim, caption, caption_records, captions, describes,
    describes_matrix, mentioned_attributes,
)

__all__ = [
    "sample_scenes", "render", "render_array", "captions", "caption", "caption_records", "instructions",
    "instruction_records", "describes", "describes_matrix", "mentioned_attributes", "content_split",
    "Scene", "SceneObject", "Caption", "Claim", "ObjectClaim",
    "COLORS", "SHAPES", "SIZES", "REGIONS", "BACKGROUNDS", "SPLITS", "STYLES", "HELDOUT_COMBOS",
    "COLOR_PROMPT", "SHAPE_PROMPT", "IMAGE_TOKEN", "IMAGE_SIZE",
]
