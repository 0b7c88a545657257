#!/usr/bin/env python
"""The generator's CPU-side ceiling: the whole pipeline with the encoder replaced by a stand-in.

On a GPU the text tower costs ~5-7 us per caption; everything else (read, validate, tokenise, align,
cast, copy, write) must keep up on the host. This benchmark runs the real local executor
(:func:`anisogen.generate.executors.run_local`: DataLoader workers, the device step in the main thread, the
background writer) over a jsonl corpus of captions, with **only** the encoder replaced by a stand-in that
returns right-shaped unit rows at once (benchmark only). It reports, per configuration:

* texts/s (wall) and texts per CPU-second (= per core: CPU time of the process, its threads and its
  DataLoader workers, from ``getrusage``);
* main-thread CPU us per text (``time.thread_time`` in the main thread), the part that would sit between
  two GPU batches;
* the stage split from the shard records.

Configurations: the aligner applied by its device transform on this CPU (``anisoalign`` / ``realign`` at
d = 512, as on a CPU-only machine), and ``align=device``: the transform also replaced by a stand-in, i.e.
the host cost when encoder and aligner both run on a GPU. ``--workers 1 2`` measures DataLoader scaling;
``--processes 2`` runs two executors side by side on disjoint halves of the tasks (two ranks on one node).

    .venv/bin/python benchmarks/bench_generate_ceiling.py --texts 60000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tokenizer import captions  # noqa: E402  (toy-world captions, all seven styles, shuffled)

DIM = 512


class StandInEncoder:
    """Returns unit rows of the right shape at once: a view of a fixed pool (no copy, like a GPU result
    that costs the host nothing)."""

    def __init__(self, tokenizer, dim: int = DIM, pool: int = 20_000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(pool, dim, generator=g)
        self.pool = torch.nn.functional.normalize(x, dim=1)
        self.tokenizer, self.device, self.embed_dim = tokenizer, torch.device("cpu"), dim

    def encode_tokenized_tensor(self, tok, stats=None):
        n = len(tok)
        out = self.pool[:n] if n <= len(self.pool) else self.pool[torch.arange(n) % len(self.pool)]
        if stats is not None:
            stats.texts += n
            stats.tokens += int(tok.lengths.sum())
            stats.truncated += int(tok.truncated.sum())
        return out


class StandInTransform:
    """The aligner on a GPU costs the host nothing: returns its input."""

    def map_async(self, x):
        return x, torch.zeros(len(x), dtype=torch.bool)


def fit_aligner(name: str, dim: int = DIM, seed: int = 0, device: str = "cpu"):
    """An aligner fitted on synthetic unpaired embeddings of dimension ``dim`` with short loops (speed only:
    the default rank and network sizes, few training steps)."""
    from anisogen.align import fit_aligner as fit

    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, dim))
    text = rng.standard_normal((8192, 64)) @ basis + 0.4 * rng.standard_normal((8192, dim)) + 2.0
    image = rng.standard_normal((8192, 64)) @ basis + 0.4 * rng.standard_normal((8192, dim)) - 1.0
    params = {}
    if name.startswith("anisoalign"):
        params = dict(select="none", stage1_steps=60, stage2_steps=60, stage1_patience=None)
    return fit(name, text=text, image=image, seed=seed, normalize=True, device=device, **params)


def run_one(corpus: str, out: str, aligner, tasks, workers: int, align: str, cache: str) -> dict:
    from anisogen.encode.corpus import Corpus
    from anisogen.encode.text import ClipTokenizer
    from anisogen.generate.context import Context
    from anisogen.generate.executors import run_local
    from anisogen.generate.task import TaskInputs, TaskOutputs
    import open_clip

    torch.set_num_threads(1)
    tok = ClipTokenizer(open_clip.get_tokenizer("ViT-B-32"))
    enc = StandInEncoder(tok)
    corp = Corpus([corpus], text_field="text", cache_dir=cache)
    corp.dataset()

    def make_context():
        outputs = TaskOutputs(out, enc, aligner, "stand-in", "fp16", False,
                              transform=StandInTransform() if align == "device" else None)
        return Context(TaskInputs(corp, tok), outputs, None, None, "stand-in", corp, enc)

    records = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0, t0 = time.thread_time(), time.perf_counter()
    run_local(tasks, make_context, records.append, workers=workers)
    wall, main = time.perf_counter() - t0, time.thread_time() - m0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(r1, f) - getattr(r0, f) + getattr(c1, f) - getattr(c0, f) for f in ("ru_utime", "ru_stime"))
    n = sum(r["nsamples"] for r in records)
    stages = {s: sum(r["stats"][f"{s}_s"] for r in records) for s in ("read", "tokenize", "encode", "align", "write")}
    return {"texts": n, "wall_s": wall, "cpu_s": cpu, "main_cpu_s": main, "stages": stages}


def _child(args, conn):
    conn.send(run_one(*args))
    conn.close()


def measure(corpus, out_root, aligner, all_tasks, workers, align, processes, cache, tag) -> dict:
    import shutil

    out = Path(out_root) / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if processes == 1:
        res = run_one(corpus, str(out), aligner, all_tasks, workers, align, cache)
        res["procs"] = 1
        return res
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    t0 = time.perf_counter()
    for r in range(processes):
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=((corpus, str(out), aligner, all_tasks[r::processes], workers, align,
                                              cache), b))
        p.start()
        pipes.append(a)
        procs.append(p)
    parts = [a.recv() for a in pipes]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    return {"texts": sum(p["texts"] for p in parts), "wall_s": wall, "cpu_s": sum(p["cpu_s"] for p in parts),
            "main_cpu_s": sum(p["main_cpu_s"] for p in parts), "procs": processes,
            "stages": {s: sum(p["stages"][s] for p in parts) for s in parts[0]["stages"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=60_000)
    p.add_argument("--samples-per-shard", type=int, default=5_000)
    p.add_argument("--aligners", nargs="+", default=["anisoalign", "realign"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--processes", type=int, default=2, help="also run this many executors side by side (0: skip)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    from anisogen.generate.task import plan_tasks

    tmp = Path(tempfile.mkdtemp(prefix="anisogen-ceiling-"))
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, t in enumerate(captions(args.texts)):
            f.write(json.dumps({"text": t}) + "\n")
    tasks = plan_tasks(args.texts, args.samples_per_shard)
    aligners = {name: fit_aligner(name) for name in args.aligners}
    configs = [(name, "host", w, 1) for name in args.aligners for w in args.workers]
    configs += [(args.aligners[0], "device", w, 1) for w in args.workers]
    if args.processes > 1:
        configs += [(args.aligners[0], "device", 1, args.processes), (args.aligners[0], "host", 1, args.processes)]
    results: dict = {}
    for rnd in range(args.rounds):  # interleaved rounds: the machine is shared
        for cfg in configs:
            name, align, w, procs = cfg
            res = measure(str(corpus), tmp / "out", aligners[name], tasks, w, align, procs, str(tmp / "cache"),
                          f"{name}-{align}-{w}-{procs}")
            results.setdefault(cfg, []).append(res)
    print(f"\n{args.texts} captions, {args.samples_per_shard}/shard, d={DIM}, fp16, stand-in encoder, "
          f"best of {args.rounds} rounds, torch threads 1\n")
    print("| aligner | align on | workers | procs | texts/s | texts per CPU-s | main-thread us/text | split "
          "read/tok/align/write s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for cfg, runs in results.items():
        best = min(runs, key=lambda r: r["wall_s"])
        st = best["stages"]
        row = {"aligner": cfg[0], "align": cfg[1], "workers": cfg[2], "procs": cfg[3],
               "texts_per_s": best["texts"] / best["wall_s"], "texts_per_cpu_s": best["texts"] / best["cpu_s"],
               "main_us_per_text": 1e6 * best["main_cpu_s"] / best["texts"], "stages": st}
        rows.append(row)
        print(f"| {cfg[0]} | {'GPU (stand-in)' if cfg[1] == 'device' else 'this CPU'} | {cfg[2]} | {cfg[3]} | "
              f"{row['texts_per_s']:,.0f} | {row['texts_per_cpu_s']:,.0f} | {row['main_us_per_text']:.1f} | "
              f"{st['read']:.2f}/{st['tokenize']:.2f}/{st['align']:.2f}/{st['write']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
