"""Scenes of the toy world: 1-3 coloured shapes on a plain background, sampled deterministically.

A scene's *content* is its background and its set of objects (shape, colour, size, region); the jitter
used when rendering (exact offsets, rotation, colour noise, pixel noise) comes from ``render_seed`` and
is not content. The split of the world is a pure function of content (:func:`content_split`):

* ``"novel"``: the scene contains at least one held-out colour-shape combination
  (:data:`HELDOUT_COMBOS`), never seen in training; for compositional tests;
* ``"heldout"``: otherwise, when a hash of the content key falls in the held-out bucket
  (:data:`HELDOUT_PERCENT` % of contents);
* ``"train"``: everything else.

So no held-out (or novel) scene content can ever appear in training, whatever seeds are used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: Object colours (canonical names) and their nominal sRGB values.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 55),
    "cyan": (40, 205, 215),
    "blue": (35, 70, 215),
    "purple": (130, 50, 190),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)

#: Shapes (canonical names); see :mod:`anisogen.toyworld.render` for their geometry.
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "star", "cross", "heart", "ring", "crescent", "arrow",
)

#: Sizes and their nominal diameter in pixels at the 64 x 64 reference resolution.
SIZE_PX: dict[str, float] = {"small": 12.0, "large": 20.0}
SIZES: tuple[str, ...] = tuple(SIZE_PX)

#: Regions and their grid coordinates (column, row) on a 3 x 3 grid; pixel centres at 64 x 64 are
#: 14 + 18 * column, 14 + 18 * row.
REGION_GRID: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (2, 0),
    "center": (1, 1),
    "bottom left": (0, 2),
    "bottom right": (2, 2),
}
REGIONS: tuple[str, ...] = tuple(REGION_GRID)

#: Background colours (disjoint from the object colours) and their sRGB values.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 20),
    "white": (238, 238, 236),
    "beige": (226, 212, 182),
    "charcoal": (72, 74, 80),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)

#: Colour-shape combinations that never occur in the train or heldout splits (one per colour).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({
    ("red", "crescent"), ("orange", "ring"), ("yellow", "arrow"), ("green", "star"), ("cyan", "heart"),
    ("blue", "triangle"), ("purple", "square"), ("pink", "cross"), ("brown", "circle"),
})

#: Percentage of (non-novel) scene contents assigned to the heldout split.
HELDOUT_PERCENT = 10

SPLITS: tuple[str, ...] = ("train", "heldout", "novel")
MAX_OBJECTS = 3


@dataclass(frozen=True)
class SceneObject:
    """One object: canonical ``shape`` (in SHAPES), ``color`` (COLORS), ``size`` (SIZES), ``region`` (REGIONS)."""

    shape: str
    color: str
    size: str
    region: str

    def __post_init__(self):
        for field, vocab in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("region", REGIONS)):
            if getattr(self, field) not in vocab:
                raise ValueError(f"SceneObject.{field}={getattr(self, field)!r} is not one of {vocab}")

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "region": self.region}


@dataclass(frozen=True)
class Scene:
    """A scene: 1-3 objects in distinct regions, a background colour, and the seed of its render jitter.

    ``objects`` are kept in the order they are drawn (later ones on top); captions may mention them in
    any order.
    """

    objects: tuple[SceneObject, ...]
    background: str
    render_seed: int

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        regions = [o.region for o in self.objects]
        if len(set(regions)) != len(regions):
            raise ValueError(f"scene objects must occupy distinct regions, got {regions}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background={self.background!r} is not one of {BACKGROUNDS}")
        if not 0 <= int(self.render_seed) < 2**63:
            raise ValueError(f"Scene.render_seed must be in [0, 2**63), got {self.render_seed}")

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    def content_key(self) -> str:
        """Canonical text of the content (background + objects sorted by region); no jitter."""
        objs = sorted(self.objects, key=lambda o: REGIONS.index(o.region))
        parts = [f"{o.region}:{o.size}:{o.color}:{o.shape}" for o in objs]
        return f"bg={self.background}|" + "|".join(parts)

    def to_dict(self) -> dict:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "background": self.background,
            "render_seed": int(self.render_seed),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        try:
            objects = tuple(SceneObject(**o) for o in data["objects"])
            return cls(objects=objects, background=data["background"], render_seed=int(data["render_seed"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a scene record: {exc}") from None

    def describe(self) -> str:
        """Canonical full description (fixed wording), e.g. for printing next to generated captions."""
        objs = ", ".join(f"a {o.size} {o.color} {o.shape} in the {o.region}" for o in self.objects)
        return f"{objs} on a {self.background} background"


def _content_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def content_split(scene: Scene) -> str:
    """``"novel"``, ``"heldout"`` or ``"train"``: a pure function of the scene content (see module doc)."""
    if any((o.color, o.shape) in HELDOUT_COMBOS for o in scene.objects):
        return "novel"
    if _content_hash(scene.content_key()) % 100 < HELDOUT_PERCENT:
        return "heldout"
    return "train"


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _object_counts(n_objects) -> tuple[int, ...]:
    if n_objects is None:
        return tuple(range(1, MAX_OBJECTS + 1))
    counts = (int(n_objects),) if np.isscalar(n_objects) else tuple(int(c) for c in n_objects)
    if not counts or any(not 1 <= c <= MAX_OBJECTS for c in counts):
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS} (or a sequence of such), got {n_objects!r}")
    return counts


def random_scene(rng: np.random.Generator, counts: Sequence[int] = (1, 2, 3)) -> Scene:
    """Draw one scene uniformly: object count from ``counts``, distinct regions, independent attributes."""
    k = int(counts[rng.integers(len(counts))])
    regions = rng.permutation(len(REGIONS))[:k]
    objects = tuple(
        SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=COLORS[rng.integers(len(COLORS))],
            size=SIZES[rng.integers(len(SIZES))],
            region=REGIONS[r],
        )
        for r in regions
    )
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(objects=objects, background=background, render_seed=int(rng.integers(2**63)))


def sample_scenes(n: int, split: str = "train", seed: int = 0, *, n_objects=None, stream: int = 0) -> list[Scene]:
    """``n`` scenes of ``split`` ("train" | "heldout" | "novel"), deterministic in ``(split, seed, n_objects,
    stream)``. Different ``stream`` values give independent draws for the same seed (e.g. the text-only
    corpus and the unpaired image set of one corpus build).

    Scenes are drawn uniformly (object count uniform over ``n_objects``: None = 1..3, an int, or a
    sequence) and kept when :func:`content_split` equals ``split`` (rejection sampling), so the result
    is a prefix-stable stream: ``sample_scenes(m)`` is the first ``m`` of ``sample_scenes(n)`` for m <= n.
    Contents may repeat within a split (there are only ~3k one-object contents), never across splits.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    counts = _object_counts(n_objects)
    if int(stream) < 0:
        raise ValueError(f"stream must be >= 0, got {stream}")
    extra = [int(stream)] if stream else []  # stream 0 is the default stream
    rng = np.random.default_rng([int(seed), _split_code(split), *counts, 0x70E, *extra])
    out: list[Scene] = []
    attempts = 0
    while len(out) < n:
        scene = random_scene(rng, counts)
        attempts += 1
        if content_split(scene) == split:
            out.append(scene)
        elif attempts > 1000 + 200 * n:  # cannot happen for the built-in vocabularies; guards edits
            raise RuntimeError(f"split {split!r} is (almost) empty for n_objects={n_objects!r}")
    return out


def iter_split_contents(scenes: Iterable[Scene]) -> set[str]:
    """Set of content keys of ``scenes`` (helper for disjointness checks)."""
    return {s.content_key() for s in scenes}
