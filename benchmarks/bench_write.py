#!/usr/bin/env python
"""Shard writing cost per sample, one thread: the dict path vs the columnar path, interleaved.

* ``dicts`` (the previous generator path): one ``schema.sample_members`` dict per sample (meta dict ->
  ``canonical_json``, ``npy_bytes`` per row), written by ``writer.write_shard`` (``UstarWriter``);
* ``columnar``: ``writer.write_task_shard`` on the same columns (texts, ids, rows, n_tokens, truncated,
  the (n, d) storage-dtype array).

Both publish atomically (temp file, sha256 while writing, fsync, rename, directory fsync) into a temp
directory, and each round checks that both wrote the same sha256. The two run alternately for
``--rounds`` rounds (the machine is shared and noisy); the table gives the median over rounds of the
process CPU time and of the wall time per sample. A third, instrumented pass per round splits the
columnar path into formatting (``TaskShardFormatter`` chunks), sha256, file write (page cache) and
fsync + rename + directory fsync (wall; it depends on the disk). Texts are toy-world captions (~62 chars).

    .venv/bin/python benchmarks/bench_write.py --n 10000 --dim 512 --dtype fp16 --rounds 7
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anisogen.shards import schema, writer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer import captions  # noqa: E402  (toy-world captions, all seven styles, shuffled)

MODEL = "ViT-B-32|openai|sha256=" + "0123456789abcdef" * 4
ALIGNER = "anisoalign-r128"


def make_columns(n: int, dim: int, dtype: str, src: bool, task: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = task * n
    rows = np.arange(start, start + n)
    return dict(
        rows_in_task=rows - start, texts=captions(n, seed), emb=schema.encode_embedding(x, dtype),
        ids=[str(r) for r in rows.tolist()], rows=rows.tolist(), n_tokens=rng.integers(8, 40, size=n),
        truncated=rng.random(n) < 0.01, model=MODEL, aligner=ALIGNER,
        src=schema.encode_embedding(rng.standard_normal((n, dim)).astype(np.float32), dtype) if src else None,
    )


def run_dicts(out: Path, task: int, c: dict) -> dict:
    """The previous path, as ``generate/task.py`` built it: a meta dict + ``sample_members`` per sample."""
    emb, src, texts, ids, rows = c["emb"], c["src"], c["texts"], c["ids"], c["rows"]
    lengths, trunc, rit = c["n_tokens"], c["truncated"], c["rows_in_task"]

    def samples():
        for i in range(len(texts)):
            meta = {"id": ids[i], "row": rows[i], "n_tokens": int(lengths[i]), "truncated": bool(trunc[i]),
                    "model": c["model"], "aligner": c["aligner"]}
            yield schema.sample_members(schema.make_key(task, int(rit[i])), texts[i], emb[i], meta,
                                        None if src is None else src[i])

    return writer.write_shard(out, task, samples())


def run_columnar(out: Path, task: int, c: dict, chunk: int) -> dict:
    return writer.write_task_shard(out, task, **c, chunk=chunk)


def run_split(out: Path, task: int, c: dict, chunk: int) -> dict[str, float]:
    """The columnar path phase by phase, seconds: check + format, sha256, write (CPU); fsync + rename (wall)."""
    t = {"format": 0.0, "sha256": 0.0, "write": 0.0, "fsync+rename": 0.0}
    a = time.process_time()
    cols = writer._check_task_columns(task, c["rows_in_task"], c["texts"], c["emb"], c["ids"], c["rows"],
                                      c["n_tokens"], c["truncated"], c["src"])
    rit, texts, emb, ids, rows, n_tokens, truncated, src = cols
    fmt = writer.TaskShardFormatter(task, rit, texts, emb, ids, rows, n_tokens, truncated, c["model"], c["aligner"],
                                    src, chunk=chunk)
    final = out / schema.shard_name(task)
    tmp = writer.temp_path(final)
    sha = hashlib.sha256()
    with open(tmp, "wb") as f:
        for data, _ in fmt.chunks():
            b = time.process_time()
            t["format"] += b - a
            sha.update(data)
            a = time.process_time()
            t["sha256"] += a - b
            f.write(data)
            b = time.process_time()
            t["write"] += b - a
            a = b
        f.flush()
        w = time.perf_counter()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    writer.fsync_dir(out)
    t["fsync+rename"] = time.perf_counter() - w
    return t


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    entry = fn(*args)
    return entry, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="samples per shard")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="fp16", choices=sorted(schema.EMB_DTYPES))
    ap.add_argument("--src", action="store_true", help="also write src.npy (--keep-source)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=1024, help="samples per formatted chunk (columnar path)")
    ap.add_argument("--dir", default=None, help="parent of the temp output directory (default: system temp)")
    args = ap.parse_args()

    c = make_columns(args.n, args.dim, args.dtype, args.src, task=3)
    n = args.n
    res = {"dicts": ([], []), "columnar": ([], [])}
    split = {k: [] for k in ("format", "sha256", "write", "fsync+rename")}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_write-") as tmp:
        dirs = {k: Path(tmp) / k for k in ("dicts", "columnar", "split")}
        for d in dirs.values():
            d.mkdir()
        run_columnar(dirs["columnar"], 3, c, args.chunk)  # warm-up: imports, npy header cache, templates
        run_dicts(dirs["dicts"], 3, c)
        nbytes = None
        for r in range(args.rounds):
            order = ("dicts", "columnar") if r % 2 == 0 else ("columnar", "dicts")
            entries = {}
            for name in order:
                fn = run_dicts if name == "dicts" else run_columnar
                extra = () if name == "dicts" else (args.chunk,)
                entries[name], cpu, wall = timed(fn, dirs[name], 3, c, *extra)
                res[name][0].append(cpu / n * 1e6)
                res[name][1].append(wall / n * 1e6)
            if entries["dicts"]["sha256"] != entries["columnar"]["sha256"]:
                raise SystemExit("the two paths wrote different bytes")
            nbytes = entries["columnar"]["bytes"]
            for k, v in run_split(dirs["split"], 3, c, args.chunk).items():
                split[k].append(v / n * 1e6)

    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
    print(f"n={n} d={args.dim} {args.dtype} src={args.src} chunk={args.chunk} rounds={args.rounds} "
          f"{nbytes / n:.0f} B/sample, mean text {np.mean([len(t) for t in c['texts']]):.1f} chars; "
          "identical sha256 in every round")
    print()
    print("| path | CPU µs/sample (median) | wall µs/sample (median) | CPU min–max |")
    print("|---|---:|---:|---:|")
    for k, (cpu, wall) in med.items():
        print(f"| {k} | {cpu:.2f} | {wall:.2f} | {min(res[k][0]):.2f}–{max(res[k][0]):.2f} |")
    print(f"| ratio dicts / columnar | {med['dicts'][0] / med['columnar'][0]:.1f}x | "
          f"{med['dicts'][1] / med['columnar'][1]:.1f}x | |")
    print()
    print("columnar split, µs/sample (median over rounds; fsync+rename is wall time, the rest CPU):")
    print()
    print("| format | sha256 | file write | fsync+rename | sum w/o fsync |")
    print("|---:|---:|---:|---:|---:|")
    m = {k: statistics.median(v) for k, v in split.items()}
    print(f"| {m['format']:.2f} | {m['sha256']:.2f} | {m['write']:.2f} | {m['fsync+rename']:.2f} | "
          f"{m['format'] + m['sha256'] + m['write']:.2f} |")


if __name__ == "__main__":
    main()
