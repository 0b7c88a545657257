"""Shared fixtures for the generator tests: a small corpus with every kind of bad record, image embeddings,
and helpers that compare shard folders. (No tests here.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from anisogen.generate import GenerateConfig
from anisogen.shards.schema import SHARD_GLOB

WORDS = ("a photo of the red cube next to blue sphere on green background with small large tiny many "
         "objects near far left right top bottom corner").split()
LONG_ROW = 17


def write_corpus(path: Path, n: int = 240, seed: int = 0) -> dict[int, str]:
    """Write a .jsonl corpus of ``n`` lines; returns ``{row: reason}`` of the lines that must be rejected.

    Besides normal captions it holds: missing field, number, null, empty, blank line, invalid JSON,
    invalid UTF-8 bytes, a lone surrogate, a text far longer than the context (row ``LONG_ROW``),
    and exact duplicates (rows 200+ repeat rows 0+; rejected only with dedup).
    """
    rng = np.random.default_rng(seed)
    expected: dict[int, str] = {}
    lines: list[bytes] = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, rng.integers(2, 22)))
        rec = {"text": text, "id": f"doc{i}"}
        line = json.dumps(rec).encode()
        kind = i % 41
        if i == LONG_ROW:
            line = json.dumps({"text": " ".join(["word"] * 200), "id": f"doc{i}"}).encode()
        elif kind == 3:
            line, expected[i] = json.dumps({"caption": text, "id": f"doc{i}"}).encode(), "missing_field"
        elif kind == 7:
            line, expected[i] = json.dumps({"text": 12345, "id": f"doc{i}"}).encode(), "non_string"
        elif kind == 11:
            line, expected[i] = json.dumps({"text": None, "id": f"doc{i}"}).encode(), "non_string"
        elif kind == 13:
            line, expected[i] = json.dumps({"text": "   ", "id": f"doc{i}"}).encode(), "empty"
        elif kind == 19:
            line, expected[i] = b"", "empty"
        elif kind == 23:
            line, expected[i] = b'{"text": "unterminated', "invalid_json"
        elif kind == 29:
            line, expected[i] = b'{"text": "bad \xff\xfe bytes", "id": "x"}', "invalid_unicode"
        elif kind == 31:
            line, expected[i] = b'{"text": "lone \\ud800 surrogate", "id": "y"}', "invalid_unicode"
        elif i >= 200:
            line = lines[i - 200] if (i - 200) not in expected and (i - 200) != LONG_ROW else line
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def write_images(path: Path, n: int = 300, d: int = 128, seed: int = 1) -> Path:
    """Unpaired 'image' embeddings (float32 (n, d), shifted mean) as a .npy file."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) + 0.3
    np.save(path, x)
    return path


def make_config(tmp: Path, corpus: Path, images: Path, out: str = "out", **kw) -> GenerateConfig:
    base = dict(corpus=[str(corpus)], out=str(tmp / out), id_field="id", model="toy", pretrained="random",
                aligner="centroid", images=None if images is None else str(images), fit_samples=120,
                samples_per_shard=50, batch_size=16,
                workers=0, threads=1, progress=False, cache_dir=str(tmp / "hf-cache"))
    base.update(kw)
    return GenerateConfig(**base)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """name -> bytes of every shard, plus sizes.json and rejects.jsonl."""
    out = {p.name: p.read_bytes() for p in sorted(Path(folder).glob(SHARD_GLOB))}
    for name in ("sizes.json", "rejects.jsonl"):
        out[name] = (Path(folder) / name).read_bytes()
    return out


def manifest_core(folder: Path) -> list[tuple]:
    """The deterministic part of the manifest's shard entries."""
    m = json.loads((Path(folder) / "manifest.json").read_text())
    return [(e["name"], e["nsamples"], e["sha256"], e["key_first"], e["key_last"], e["rejects"]) for e in m["shards"]]


def test_progress_postfix_counts_the_rejects_of_every_process(tmp_path):
    """The main process's bar reads every process's completion records (each once), not only its own."""
    from anisogen.generate.run import _Progress
    from anisogen.shards.schema import RECORDS_DIRNAME

    records = tmp_path / RECORDS_DIRNAME
    records.mkdir()
    bar = _Progress(True, total=400, out=tmp_path, sps=100)
    for task, rejects in ((0, 3), (1, 4)):  # e.g. written by rank 0 and rank 1
        (records / f"shard-{task:06d}.json").write_text(json.dumps({"task": task, "rejects": rejects}))
    bar.update(force=True)
    assert bar.bar.n == 200 and bar.bar.postfix == "shards=2, rejects=7"
    (records / "shard-000002.json").write_text(json.dumps({"task": 2, "rejects": 1}))
    bar.update(force=True)
    assert bar.bar.n == 300 and bar.bar.postfix == "shards=3, rejects=8"  # old records are not counted twice
    bar.close()
