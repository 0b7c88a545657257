#!/usr/bin/env python
"""Generator throughput on a GPU: encoder alone vs the whole pipeline (run by gpu_suite_generate.sh).

For each model (random weights, bf16 autocast) and caption length:

* **encoder**: ``TextEncoder.encode_tokenized_tensor`` on pre-tokenised texts, batches of ``--batch``,
  timed with ``torch.cuda.synchronize`` (the upper bound the pipeline can reach);
* **pipeline**: the local executor (:func:`anisogen.generate.executors.run_local`) over a jsonl corpus:
  DataLoader workers read and tokenise, the main thread encodes, aligns (ReAlign / AnisoAlign device
  transform) and casts on the GPU, the background writer publishes fp16 shards. Aligners are fitted on
  synthetic data with short loops (speed only). Texts/s is wall time from the first task to the last record.

Prints a markdown table and writes ``--out`` (JSON). Caption sets: ~16-token toy-world captions and
~40-token English sentences from installed package descriptions.

    python benchmarks/gpu_generate.py --models ViT-B-32 ViT-L-14 --out gpu_generate.json

``--device cpu`` runs the same flow on a CPU (a smoke test of the script, e.g. ``--models toy --texts 4000
--samples-per-shard 1000 --batch 256 --workers 1``); its numbers mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import english_sentences  # noqa: E402
from bench_generate_ceiling import fit_aligner  # noqa: E402
from bench_tokenizer import captions  # noqa: E402


def text_sets(n: int, tok) -> dict[str, list[str]]:
    short = captions(n)
    long_pool = english_sentences(200_000)
    lens = tok(long_pool).lengths
    long_pool = [t for t, L in zip(long_pool, lens) if 32 <= L <= 48] or long_pool
    return {"~16 tok": short, "~40 tok": [long_pool[i % len(long_pool)] for i in range(n)]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_only(encoder, tokens, batch: int) -> float:
    n = len(tokens)
    for start in range(0, min(n, 4 * batch), batch):  # warm-up: kernels, allocator
        encoder.encode_tokenized_tensor(tokens.take(np.arange(start, min(start + batch, n))))
    sync(encoder.device)
    t0 = time.perf_counter()
    chunk = 50_000
    for start in range(0, n, chunk):
        encoder.encode_tokenized_tensor(tokens.take(np.arange(start, min(start + chunk, n))))
    sync(encoder.device)
    return n / (time.perf_counter() - t0)


def pipeline(corpus, encoder, tok, aligner, out: Path, texts: int, sps: int, workers: int) -> float:
    from anisogen.generate.context import Context
    from anisogen.generate.executors import run_local
    from anisogen.generate.task import TaskInputs, TaskOutputs, plan_tasks

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    outputs = TaskOutputs(str(out), encoder, aligner, "bench", "fp16", False)
    ctx = Context(TaskInputs(corpus, tok), outputs, encoder.model, None, "bench", corpus, encoder)
    tasks = plan_tasks(texts, sps)
    n = [0]
    # warm-up task (compiles nothing, but touches every kernel shape once)
    run_local(tasks[:1], lambda: ctx, lambda r: None, workers=0)
    shutil.rmtree(out)
    out.mkdir()
    sync(encoder.device)
    t0 = time.perf_counter()
    run_local(tasks, lambda: ctx, lambda r: n.__setitem__(0, n[0] + r["nsamples"]), workers=workers)
    sync(encoder.device)
    return n[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--texts", type=int, nargs="+", default=[1_000_000, 250_000], help="texts per model")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--samples-per-shard", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--aligners", nargs="+", default=["realign", "anisoalign"])
    p.add_argument("--out", default="gpu_generate.json")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from anisogen.encode.clip import embed_dim, load_clip
    from anisogen.encode.corpus import Corpus
    from anisogen.encode.text import TextEncoder

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the device transform's precision contract
        torch.set_float32_matmul_precision("highest")
    tmp = Path(tempfile.mkdtemp(prefix="anisogen-gpu-gen-"))
    rows = []
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke test)"
    print(f"# {name}, torch {torch.__version__}", flush=True)
    print("| model | texts | captions | encoder texts/s | aligner | pipeline texts/s | pipeline / encoder |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for model_name, n in zip(args.models, args.texts * len(args.models)):
        model, _, raw_tok = load_clip(model_name, "random", device=dev)
        encoder = TextEncoder(model, raw_tok, device=dev, batch_size=args.batch,
                              precision="bf16" if dev.type == "cuda" else "fp32")
        tok = encoder.tokenizer
        d = embed_dim(model)
        aligners = {a: fit_aligner(a, dim=d, device=dev.type) for a in args.aligners}
        for label, texts in text_sets(n, tok).items():
            path = tmp / f"{model_name}-{label[1:3]}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
            corpus = Corpus([str(path)], text_field="text", cache_dir=str(tmp / "cache"))
            corpus.dataset()
            enc_rate = encoder_only(encoder, tok(texts), args.batch)
            for a, aligner in aligners.items():
                rate = pipeline(corpus, encoder, tok, aligner, tmp / "out", n, args.samples_per_shard, args.workers)
                row = {"model": model_name, "texts": n, "captions": label, "encoder_texts_per_s": enc_rate,
                       "aligner": a, "pipeline_texts_per_s": rate, "ratio": rate / enc_rate}
                rows.append(row)
                print(f"| {model_name} | {n:,} | {label} | {enc_rate:,.0f} | {a} | {rate:,.0f} | "
                      f"{rate / enc_rate:.2f} |",
                      flush=True)
                Path(args.out).write_text(json.dumps(rows, indent=1))
        del model, encoder
        torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
