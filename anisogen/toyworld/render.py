"""Rendering toy-world scenes with Pillow: supersampled (anti-aliased), jittered, with pixel noise.

Each object is drawn as a mask at ``SUPERSAMPLE`` x the output resolution (so rings and crescents have
real holes and overlapping objects composite correctly), filled with its jittered colour, and the canvas
is downsampled with a box filter. Jitter (centre offset up to ``JITTER_PX`` px, size +-1 px,
rotation +-``ROTATION_DEG`` degrees, colour +-``COLOR_JITTER`` per channel) and Gaussian pixel noise
(sigma ``NOISE_STD`` grey levels) are drawn from ``scene.render_seed``, so ``render(scene)`` is
deterministic.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUND_RGB, COLOR_RGB, REGION_GRID, SIZE_PX, Scene

#: Default output resolution (pixels, square).
IMAGE_SIZE = 64
SUPERSAMPLE = 4
JITTER_PX = 2.0
ROTATION_DEG = 12.0
COLOR_JITTER = 14
BACKGROUND_JITTER = 8
NOISE_STD = 3.0


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(outer: float, inner: float) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart(radius: float) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts * (radius / 16.5)


def _polygon(shape: str, d: float) -> np.ndarray | None:
    """Unrotated polygon (K, 2) in pixels around the origin for a shape of nominal diameter ``d``."""
    if shape == "square":
        h = 0.42 * d
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":
        return _regular(3, 0.58 * d) + np.array([0.0, 0.08 * d])
    if shape == "diamond":
        return np.array([[0, -0.56 * d], [0.38 * d, 0], [0, 0.56 * d], [-0.38 * d, 0]])
    if shape == "star":
        return _star(0.58 * d, 0.25 * d)
    if shape == "cross":
        a, w = 0.5 * d, 0.17 * d
        return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w],
                         [-a, w], [-a, -w], [-w, -w]])
    if shape == "heart":
        return _heart(0.55 * d)
    if shape == "arrow":
        a, sw, hw, neck = 0.52 * d, 0.13 * d, 0.34 * d, 0.05 * d
        return np.array([[-a, -sw], [neck, -sw], [neck, -hw], [a, 0], [neck, hw], [neck, sw], [-a, sw]])
    return None  # circle, ring, crescent: drawn with ellipses


def _draw_object(mask: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, angle: float) -> None:
    def ellipse(x, y, r, fill):
        mask.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if shape == "circle":
        ellipse(cx, cy, 0.5 * d, 255)
    elif shape == "ring":
        ellipse(cx, cy, 0.52 * d, 255)
        ellipse(cx, cy, 0.28 * d, 0)
    elif shape == "crescent":
        ellipse(cx, cy, 0.52 * d, 255)
        off = 0.30 * d
        ellipse(cx + off * math.cos(angle), cy - off * math.sin(angle) - 0.08 * d, 0.44 * d, 0)
    else:
        pts = _rotate(_polygon(shape, d), angle) + np.array([cx, cy])
        mask.polygon([tuple(p) for p in pts.tolist()], fill=255)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` to an RGB ``PIL.Image`` of ``size`` x ``size`` pixels (deterministic)."""
    rng = np.random.default_rng([int(scene.render_seed), 0x4E4D])
    scale = size / IMAGE_SIZE
    big = size * SUPERSAMPLE
    f = scale * SUPERSAMPLE  # reference pixels -> supersampled pixels

    bg = np.clip(
        np.array(BACKGROUND_RGB[scene.background]) + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, 3), 0, 255
    )
    canvas = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    for obj in scene.objects:
        col, row = REGION_GRID[obj.region]
        cx = (14 + 18 * col + rng.uniform(-JITTER_PX, JITTER_PX)) * f
        cy = (14 + 18 * row + rng.uniform(-JITTER_PX, JITTER_PX)) * f
        d = (SIZE_PX[obj.size] + rng.uniform(-1.0, 1.0)) * f
        angle = math.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
        rgb = np.clip(np.array(COLOR_RGB[obj.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        mask = Image.new("L", (big, big), 0)
        _draw_object(ImageDraw.Draw(mask), obj.shape, cx, cy, d, angle)
        canvas.paste(tuple(int(v) for v in rgb), (0, 0), mask)
    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, NOISE_STD, small.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def render_array(scenes: Sequence[Scene], size: int = IMAGE_SIZE, *, progress: bool = False) -> np.ndarray:
    """Render many scenes into one uint8 array of shape (N, size, size, 3)."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    it = enumerate(scenes)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(scenes), desc="render", unit="img")
    for i, scene in it:
        out[i] = np.asarray(render(scene, size))
    return out
