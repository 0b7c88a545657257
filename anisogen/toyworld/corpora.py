"""Writing the toy-world corpora used by the demo, the gap study and the experiments.

Folder layout (all paths relative to the folder)::

    captions.jsonl            text-only corpus: {"id", "text"} per line, train-split scenes (stream 1)
    images/img0000000.png     unpaired image set: train-split scenes (stream 2), never the caption scenes
    images.jsonl              {"id", "image"} per unpaired image, in order
    heldout/images/*.png      held-out paired evaluation data (split "heldout", stream 0)
    heldout/pairs.jsonl       {"id", "image", "caption", "captions", "scene"} per held-out scene
    heldout/instructions.jsonl {"id", "scene_id", "image", "type", "conversations", "answers", "pope"}
    novel/...                 the same for scenes with held-out colour-shape combinations (optional)
    manifest.json             counts, seeds, vocabularies, files; written last

``caption`` in ``pairs.jsonl`` is the caption of style ``STYLES[i % 7]`` for scene ``i`` (the same as
:func:`anisogen.toyworld.quality.heldout_pairs`); ``captions`` holds all seven styles.

Everything is deterministic in ``seed`` (PNG files are byte-identical across runs). The folder is built
under a temporary name next to the target and renamed into place at the end, so a partial build never
looks complete; an existing target is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .. import __version__
from .instructions import instruction_records
from .render import IMAGE_SIZE, render
from .scenes import (
    BACKGROUNDS, COLORS, HELDOUT_COMBOS, HELDOUT_PERCENT, REGIONS, SHAPES, SIZES, Scene, sample_scenes,
)
from .text import STYLES, caption, captions

FORMAT = "anisogen-toyworld-corpora/1"
TEXT_STREAM, IMAGE_STREAM = 1, 2


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="item")


def _jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def _text_rows(n: int, seed: int, progress: bool):
    scenes = sample_scenes(n, "train", seed, stream=TEXT_STREAM)
    rng = np.random.default_rng([seed, 0xC0])
    styles = rng.integers(len(STYLES), size=n)
    for i, (scene, k) in enumerate(_progress(zip(scenes, styles), n, "captions", progress)):
        yield {"id": f"cap{i:07d}", "text": caption(scene, STYLES[int(k)], seed=seed).text}


def _write_images(folder: Path, scenes, prefix: str, size: int, progress: bool, desc: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i, scene in enumerate(_progress(scenes, len(scenes), desc, progress)):
        key = f"{prefix}{i:07d}"
        render(scene, size).save(folder / f"{key}.png", format="PNG", optimize=False)
        ids.append(key)
    return ids


def _write_paired(folder: Path, split: str, n: int, seed: int, size: int, progress: bool) -> dict:
    scenes = sample_scenes(n, split, seed)
    prefix = "held" if split == "heldout" else "novel"
    ids = _write_images(folder / "images", scenes, prefix, size, progress, f"{split} images")
    pairs, instr = [], []
    for i, (key, scene) in enumerate(zip(ids, scenes)):
        image = f"images/{key}.png"
        pairs.append({"id": key, "image": image, "caption": caption(scene, STYLES[i % len(STYLES)], seed=seed).text,
                      "captions": captions(scene, seed=seed), "scene": scene.to_dict()})
        for j, rec in enumerate(instruction_records(scene, seed=seed)):
            instr.append({"id": f"{key}q{j:02d}", "scene_id": key, "image": image, "type": rec["type"],
                          "conversations": rec["conversation"], "answers": rec["answers"], "pope": rec["pope"]})
    return {
        "pairs": _jsonl(folder / "pairs.jsonl", pairs),
        "instructions": _jsonl(folder / "instructions.jsonl", instr),
    }


def write_corpora(out_dir: str | os.PathLike, *, n_text: int = 100_000, n_images: int = 10_000,
                  n_heldout: int = 1000, n_novel: int = 0, seed: int = 0, image_size: int = IMAGE_SIZE,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Build the corpora folder ``out_dir`` (layout in the module doc); returns the manifest dict."""
    out = Path(out_dir)
    for name, value, minimum in (("n_text", n_text, 1), ("n_images", n_images, 1), ("n_heldout", n_heldout, 1),
                                 ("n_novel", n_novel, 0), ("image_size", image_size, 8)):
        if int(value) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        counts = {"captions": _jsonl(tmp / "captions.jsonl", _text_rows(n_text, seed, progress))}
        img_scenes = sample_scenes(n_images, "train", seed, stream=IMAGE_STREAM)
        ids = _write_images(tmp / "images", img_scenes, "img", image_size, progress, "unpaired images")
        counts["images"] = _jsonl(tmp / "images.jsonl", ({"id": k, "image": f"images/{k}.png"} for k in ids))
        counts["heldout"] = _write_paired(tmp / "heldout", "heldout", n_heldout, seed, image_size, progress)
        if n_novel:
            counts["novel"] = _write_paired(tmp / "novel", "novel", n_novel, seed, image_size, progress)
        manifest = {
            "format": FORMAT, "anisogen_version": __version__, "seed": seed, "image_size": image_size,
            "counts": counts,
            "streams": {"captions": ["train", TEXT_STREAM], "images": ["train", IMAGE_STREAM],
                        "heldout": ["heldout", 0],
                        "novel": ["novel", 0]},
            "vocabulary": {"colors": list(COLORS), "shapes": list(SHAPES), "sizes": list(SIZES),
                           "regions": list(REGIONS), "backgrounds": list(BACKGROUNDS), "styles": list(STYLES)},
            "heldout_combos": sorted(map(list, HELDOUT_COMBOS)), "heldout_percent": HELDOUT_PERCENT,
        }
        with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a complete corpora folder; raises ``FileNotFoundError``/``ValueError`` otherwise."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.json, not a (complete) toy-world corpora folder")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_pairs(folder: str | os.PathLike, split: str = "heldout") -> list[dict]:
    """Rows of ``<folder>/<split>/pairs.jsonl`` with ``scene`` parsed into a :class:`Scene` and ``image``
    made absolute. Raises ``ValueError`` naming the file and line of a malformed row."""
    read_manifest(folder)
    path = Path(folder) / split / "pairs.jsonl"
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                row["scene"] = Scene.from_dict(row["scene"])
                row["image"] = str(path.parent / row["image"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: bad pair record ({exc})") from None
            rows.append(row)
    return rows
