#!/usr/bin/env python
"""Shard reading throughput, one thread, from the page cache: the readers side by side (issue 16).

Writes ``--n`` samples (``--per-shard`` per tar, d = ``--dim``, ``--dtype``, toy-world captions ~60 chars)
once into a temp dir with ``writer.write_task_shard``, reads every tar once to warm the page cache, then
runs each reader over all tars, interleaved for ``--rounds`` rounds (the machine is shared and noisy); the
table gives the median samples/s over rounds (process CPU time and wall time) and the ratio to the fast
reader. Readers:

* ``raw bytes``: ``f.read()`` of each tar (the floor: no parsing at all);
* ``tarfile members``: ``tarfile`` iteration + ``extractfile().read()`` of every member, no decoding;
* ``tarfile + np.load`` (the previous ``iter_samples(fields=["emb"])``): ``reader.iter_tar_samples`` +
  ``np.load`` of each ``emb.npy`` + ``schema.decode_embedding``;
* ``tarfile + decode_wds_sample``: the same walk with the new one decoder (``decode_wds_sample``);
* ``webdataset + decode``: ``wds.WebDataset(urls).map(decode_wds_sample(fields=["emb"]))``;
* ``iter_samples(emb)``: the public per-sample API, now on the fast reader;
* ``read_shard(emb)``: the fast columnar reader, key + emb;
* ``read_shard(emb, txt, json)`` and ``iter_shard(emb, txt, json)``: with text and metadata.

Every round checks that the fast reader returns the same keys and embeddings as the tarfile path.

    .venv/bin/python benchmarks/bench_read.py --n 50000 --per-shard 10000 --dim 512 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from anisogen.shards import reader, schema, writer  # noqa: E402
from bench_write import make_columns  # noqa: E402


def raw_bytes(paths):
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += len(f.read())
    return n


def tarfile_members(paths):
    n = 0
    for p in paths:
        with tarfile.open(p, "r:") as tar:
            for m in tar:
                if m.isfile():
                    tar.extractfile(m).read()
                    n += 1
    return n


def tarfile_decode(paths):
    return sum(1 for p in paths for raw in reader.iter_tar_samples(p) if reader.decode_wds_sample(raw, fields=["emb"]))


def tarfile_npyload(paths):
    """The previous ``iter_samples(fields=["emb"])`` exactly: tarfile + ``np.load`` of each member."""
    n = 0
    for p in paths:
        for raw in reader.iter_tar_samples(p):
            schema.decode_embedding(schema.npy_load(raw["emb.npy"]))
            n += 1
    return n


def wds_decode(paths):
    import webdataset as wds

    ds = wds.WebDataset(list(map(str, paths)), shardshuffle=False).map(
        lambda s: reader.decode_wds_sample(s, fields=["emb"]))
    return sum(1 for _ in ds)


def iter_samples_emb(paths):
    return sum(1 for _ in reader.iter_samples(paths, fields=["emb"]))


def read_shard_emb(paths):
    return sum(len(reader.read_shard(p, fields=("emb",))) for p in paths)


def read_shard_all(paths):
    return sum(len(reader.read_shard(p, fields=("emb", "txt", "json"))) for p in paths)


def iter_shard_all(paths):
    return sum(1 for p in paths for _ in reader.iter_shard(p, fields=("emb", "txt", "json")))


READERS = [
    ("raw bytes (f.read)", raw_bytes),
    ("tarfile members (no decode)", tarfile_members),
    ("tarfile + np.load (previous iter_samples)", tarfile_npyload),
    ("tarfile + decode_wds_sample", tarfile_decode),
    ("webdataset + decode_wds_sample", wds_decode),
    ("iter_samples(fields=[emb]) (fast reader)", iter_samples_emb),
    ("read_shard(emb)", read_shard_emb),
    ("read_shard(emb, txt, json)", read_shard_all),
    ("iter_shard(emb, txt, json)", iter_shard_all),
]


def check_equal(paths):
    for p in paths:
        cols = reader.read_shard(p, fields=("emb", "txt", "json"))
        ref = [reader.decode_wds_sample(r) for r in reader.iter_tar_samples(p)]
        assert cols.keys == [r["key"] for r in ref]
        assert np.array_equal(cols.emb, np.stack([r["emb"] for r in ref]))
        assert cols.txt == [r["text"] for r in ref] and cols.json == [r["meta"] for r in ref]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--per-shard", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings of reader names to run")
    args = ap.parse_args()
    readers = [r for r in READERS if not args.only or any(s in r[0] for s in args.only.split(","))]
    with tempfile.TemporaryDirectory(prefix="bench_read_") as tmp:
        out = Path(tmp)
        paths = []
        for task, lo in enumerate(range(0, args.n, args.per_shard)):
            m = min(args.per_shard, args.n - lo)
            c = make_columns(m, args.dim, args.dtype, False, task, seed=task)
            writer.write_task_shard(out, task, **c)
            paths.append(out / f"shard-{task:06d}.tar")
        mib = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.n} samples in {len(paths)} shards ({mib:.1f} MiB), d={args.dim} {args.dtype}, "
              f"{args.rounds} rounds interleaved, page cache warm")
        check_equal(paths)
        raw_bytes(paths)
        cpu: dict[str, list[float]] = {name: [] for name, _ in readers}
        wall: dict[str, list[float]] = {name: [] for name, _ in readers}
        for _ in range(args.rounds):
            for name, fn in readers:
                c0, w0 = time.process_time(), time.perf_counter()
                got = fn(paths)
                c1, w1 = time.process_time(), time.perf_counter()
                assert name.startswith("raw") or name.startswith("tarfile members") or got == args.n, (name, got)
                cpu[name].append(c1 - c0)
                wall[name].append(w1 - w0)
        ref = statistics.median(cpu["read_shard(emb)"]) if "read_shard(emb)" in cpu else None
        print()
        print("| reader | samples/s (CPU) | samples/s (wall) | µs/sample (CPU) | CPU time vs read_shard(emb) |")
        print("|---|---:|---:|---:|---:|")
        for name, _ in readers:
            c, w = statistics.median(cpu[name]), statistics.median(wall[name])
            ratio = f"{c / ref:.2f}x" if ref else "-"
            print(f"| {name} | {args.n / c:,.0f} | {args.n / w:,.0f} | {1e6 * c / args.n:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
