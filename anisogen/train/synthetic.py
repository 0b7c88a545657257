"""A small synthetic captioning world for trainer smoke runs, tests and benchmarks.

Each item has a colour, a shape and a position; its embedding is the L2-normalised sum of fixed random
attribute directions plus noise, so the caption is predictable from the embedding and a working
trainer drives the caption loss down. Shards are written with the generator's own writer
(:mod:`anisogen.shards`), so they follow the shard schema exactly and are byte-reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond"]
POSITIONS = ["left", "right", "top", "bottom", "center"]


def attribute_directions(d: int, seed: int = 1234) -> dict[str, np.ndarray]:
    """Fixed unit vectors, one per attribute word (float64 (d,))."""
    rng = np.random.default_rng(seed)
    out = {}
    for w in COLORS + SHAPES + POSITIONS:
        v = rng.standard_normal(d)
        out[w] = v / np.linalg.norm(v)
    return out


def make_items(n: int, *, d: int = 32, seed: int = 0, noise: float = 0.1) -> list[dict]:
    """``n`` items: ``{"key", "color", "shape", "position", "caption", "emb" (d,) float32 unit}``.

    ``key`` is provisional; :func:`write_caption_shards` replaces it with the shard key."""
    rng = np.random.default_rng(seed)
    dirs = attribute_directions(d)
    items = []
    for i in range(n):
        c, s, p = (
            COLORS[rng.integers(len(COLORS))],
            SHAPES[rng.integers(len(SHAPES))],
            POSITIONS[rng.integers(len(POSITIONS))],
        )
        v = dirs[c] + dirs[s] + dirs[p] + noise * rng.standard_normal(d)
        v = (v / np.linalg.norm(v)).astype(np.float32)
        items.append({"key": f"item{seed}-{i}", "color": c, "shape": s, "position": p,
                      "caption": f"a {c} {s} on the {p}", "emb": v})
    return items


def write_caption_shards(out_dir, items: list[dict], *, samples_per_shard: int = 64, dtype: str = "fp16") -> list[str]:
    """Write ``items`` as a complete generator-format shard folder (``anisogen.shards`` writer: tars,
    ``sizes.json``, ``manifest.json``, ``rejects.jsonl``); return the tar paths.

    Each item's ``key`` is set to the schema key ``s{task:06d}-{row:06d}``. Test hooks: an item with
    ``drop_emb.npy`` / ``drop_txt`` set is written without that member.
    """
    from ..shards.schema import encode_embedding, make_key, sample_members
    from ..shards.writer import assemble, write_shard

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, paths = {}, []
    for task, s in enumerate(range(0, len(items), samples_per_shard)):
        chunk = items[s:s + samples_per_shard]
        samples = []
        for row, it in enumerate(chunk):
            it["key"] = make_key(task, row)
            meta = {"id": it["key"], "row": s + row, "n_tokens": len(it["caption"].split()) + 2, "truncated": False,
                    "model": "synthetic", "aligner": "none"}
            sample = sample_members(it["key"], it["caption"], encode_embedding(it["emb"], dtype), meta)
            for k in ("emb.npy", "txt"):
                if it.get(f"drop_{k}"):
                    del sample[k]
            samples.append(sample)
        entry = write_shard(out, task, samples)
        records[task] = {**entry, "rows": [s, s + len(chunk)], "rejects": 0, "reject_reasons": {}, "stats": {}}
        paths.append(str(out / entry["name"]))
    d = int(np.asarray(items[0]["emb"]).shape[-1]) if items else 0
    assemble(out, {"config": {"synthetic": True}, "config_fingerprint": "synthetic", "model_fingerprint": "synthetic",
                   "aligner": {"name": "none", "fingerprint": None}, "dim": d, "dtype": dtype,
                   "samples_per_shard": samples_per_shard, "num_tasks": len(records)}, records, complete=True)
    return paths


QUESTIONS = {
    "color": "What colour is the object?",
    "shape": "What shape is it?",
    "position": "Where is the object?",
}


def write_conversations(path, items: list[dict], *, ref: str = "index", text_only: int = 0) -> None:
    """Stage-2 JSONL: one question per item (cycling colour/shape/position), answer = the attribute.

    ``ref="index"`` refers to the embedding by row (pair with :func:`write_npy`), ``"key"`` by shard key.
    ``text_only=n`` also writes ``n`` text-only conversations (no ``image`` field, no marker; ids
    ``t0``, ``t1``...: "Repeat the word: w" -> "w"), spread evenly between the image ones.
    """
    kinds = list(QUESTIONS)
    words = COLORS + SHAPES + POSITIONS
    n, done = len(items), 0

    def text_record(j: int) -> dict:
        w = words[j % len(words)]
        return {"id": f"t{j}", "conversations": [{"from": "human", "value": f"Repeat the word: {w}"},
                                                 {"from": "gpt", "value": w}]}

    with open(path, "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            while done < text_only and done * n <= i * text_only:
                f.write(json.dumps(text_record(done)) + "\n")
                done += 1
            kind = kinds[i % len(kinds)]
            rec = {"id": f"q{i}", "image": i if ref == "index" else it["key"],
                   "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[kind]},
                                     {"from": "gpt", "value": it[kind]}]}
            f.write(json.dumps(rec) + "\n")
        for j in range(done, text_only):
            f.write(json.dumps(text_record(j)) + "\n")


def write_npy(path, items: list[dict]) -> None:
    """(N, d) float32 embeddings of ``items`` in order."""
    np.save(path, np.stack([it["emb"] for it in items]).astype(np.float32), allow_pickle=False)
