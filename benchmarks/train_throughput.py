#!/usr/bin/env python
"""Stage-1 training throughput of the trainer through `accelerate launch`: tokens/s and MFU.

For each model shape and each launcher, this script:

1. builds a causal LM with **random weights** (only the shape matters for speed) and saves it with
   ``save_pretrained``, next to the byte-level tokenizer of ``anisogen.train.tiny``, so that
   ``--lm <dir>`` loads it like any local HF model;
2. writes synthetic stage-1 shards (``anisogen.train.synthetic``, d = 512 embeddings, captions of
   60–124 bytes, i.e. about 64–128 input tokens with the byte-level tokenizer);
3. runs ``accelerate launch --config_file docs/accelerate/<launcher>.yaml --num_processes N
   pipelines/train.py`` for ``--steps`` optimizer steps: method ``projector`` (frozen LM),
   ``mlp2x_gelu`` projector, ``--mixed-precision bf16`` on CUDA, ``--log-every 1``, ``--no-progress``;
4. reads ``<run>/metrics.jsonl``. It skips the first ``--warmup-steps`` steps (2 by default), then
   computes tokens/s and MFU over the remaining steps.

Model shapes (all Llama, tied input/output embeddings):

==========  ======  ======  =====  ========  ============  ======  ===========
name        hidden  layers  heads  kv heads  intermediate  vocab   parameters
==========  ======  ======  =====  ========  ============  ======  ===========
tiny        64      2       4      2         128           512     CPU smoke only
smollm2     576     30      9      3         1536          49152   134.5M (SmolLM2-135M)
1b          2048    16      32     8         8192          128256  1.24B (Llama-3.2-1B)
==========  ======  ======  =====  ========  ============  ======  ===========

FLOPs model (per optimizer step, summed over all ranks)
-------------------------------------------------------
In stage 1 the LM is frozen. Its backward pass still computes the gradient with respect to the
activations, all the way down to the projector's output at the ``<image>`` positions. It computes
no weight gradients. A matmul with weight W (n parameters) therefore costs, per token, 2n FLOPs
forward and 2n FLOPs backward (dX = dY·Wᵀ), and no dW. Hence **4·N per input token** instead of
training's usual 6·N. Here N counts the matmul weights of the decoder layers: q, k, v, o, gate,
up and down projections; the input embedding is a lookup and costs nothing.

* decoder:   ``4 · N_dec`` per input token (non-pad tokens of every sequence).
* LM head:   ``4 · V · h`` per **target** token. The trainer's chunked cross-entropy
  (``anisogen.train.loss``) computes logits only at the caption positions that carry a label.
  Its recomputation of the head in the backward pass is not counted: MFU counts model FLOPs,
  not hardware FLOPs.
* attention: ``12 · L · T · (n_heads · head_dim)`` per input token, for a sequence of length T.
  The forward pass does QKᵀ and AV, 4·T·d FLOPs per token per layer. The backward pass costs
  twice that, because Q, K and V are activations: their gradients are needed. This is the
  PaLM-paper convention, which counts the full T×T product (no halving for the causal mask).
  T is the step's mean number of non-pad tokens per sequence.
* projector: ``6 · P_proj`` per embedding vector (it trains: forward, dW and dX).
  It is negligible next to the LM.

MFU = (FLOPs of the measured steps / their summed ``step_s``) / (peak × processes). ``step_s`` is
the trainer's wall time per optimizer step on rank 0, including time spent waiting for data. The
peak is dense bf16 (fp32 when ``--mixed-precision no``). It comes from ``--peak-tflops``, or from a
small table keyed by the GPU's name: H100/H200 SXM 989, H100 PCIe 756, A100 312 TFLOP/s. On a CPU,
or on an unknown GPU without ``--peak-tflops``, MFU is left empty. Padding tokens are computed but
not counted, so MFU is an achieved-useful rate.

What the script reads from ``metrics.jsonl``: lines with ``"type": "train"`` and the keys ``step``,
``step_s``, ``tokens_per_s`` (target tokens/s) and ``input_tokens_per_s``. It also reads
``data_wait_s`` when present, to report the stall fraction. A run that fails after logging its steps
(at the final checkpoint, say) is reported as failed, and its figures are kept under ``partial``.

Examples::

    # CPU smoke check (tiny model, fp32, 1 process)
    python benchmarks/train_throughput.py --models tiny --launcher ddp --num-processes 1 --steps 3
    # one GPU: both shapes, DDP and FSDP2
    python benchmarks/train_throughput.py --models smollm2,1b --launcher ddp,fsdp --num-processes 1 \\
        --steps 30 --batch-size 32 --out train_throughput.json --markdown train_throughput.md

Models and shards are cached in ``--workdir`` (default: a temporary folder), so several calls with
the same ``--workdir`` build them once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

#: Llama shapes; every one uses tied embeddings.
MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256),
}

#: accelerate config per launcher name (docs/accelerate/)
LAUNCHERS = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml",
             "zero3": "deepspeed_zero3.yaml"}

#: dense peak TFLOP/s per GPU by name substring, first match wins: (bf16, fp32)
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 51.0),
    ("H200", 989.0, 67.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
]

EMB_DIM = 512
PROJECTOR = "mlp2x_gelu"
FILLERS = [
    "with a thin outline", "next to a faint shadow", "drawn in a flat style", "on a plain background",
    "slightly tilted to one side", "with soft rounded corners", "near the middle of the frame",
    "partly covered by a grey band", "under bright even light", "with a small notch at the top",
    "beside an empty area", "in a simple sketch",
]


# ---------------------------------------------------------------------------------------------- FLOPs
def head_dim(shape: dict) -> int:
    return shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]


def decoder_matmul_params(shape: dict) -> int:
    """Matmul weights of all decoder layers (q, k, v, o, gate, up, down); norms are negligible."""
    h, hd = shape["hidden_size"], head_dim(shape)
    q = shape["num_attention_heads"] * hd
    kv = shape["num_key_value_heads"] * hd
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * shape["intermediate_size"]
    return shape["num_hidden_layers"] * (attn + mlp)


def total_params(shape: dict) -> int:
    """Parameters of the LM with tied embeddings (RMSNorm weights included)."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    return decoder_matmul_params(shape) + shape["vocab_size"] * h + (2 * layers + 1) * h


def projector_params(hidden: int, d_in: int = EMB_DIM) -> int:
    """``mlp2x_gelu``: Linear(d_in, h) -> GELU -> Linear(h, h)."""
    return d_in * hidden + hidden + hidden * hidden + hidden


def step_flops(shape: dict, input_tokens: float, target_tokens: float, sequences: float) -> dict:
    """Model FLOPs of one optimizer step (see the module docstring), split by part."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    d_attn = shape["num_attention_heads"] * head_dim(shape)
    mean_t = input_tokens / max(sequences, 1.0)
    parts = {
        "decoder": 4.0 * decoder_matmul_params(shape) * input_tokens,
        "lm_head": 4.0 * shape["vocab_size"] * h * target_tokens,
        "attention": 12.0 * layers * d_attn * mean_t * input_tokens,
        "projector": 6.0 * projector_params(h) * sequences,
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_flops_per_gpu(device_name: str | None, mixed_precision: str, override_tflops: float | None):
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return (bf16 if mixed_precision == "bf16" else fp32) * 1e12
    return None


# ------------------------------------------------------------------------------------- model and data
def build_model_dir(name: str, root: Path) -> Path:
    """Save a random-weight Llama of shape ``MODELS[name]`` plus the byte-level tokenizer; reuse if present."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from anisogen.train.tiny import build_tiny_tokenizer

    out = root / "models" / name
    stamp = out / "anisogen_bench.json"
    shape = MODELS[name]
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        return out
    if out.exists():
        shutil.rmtree(out)
    tok = build_tiny_tokenizer()
    if len(tok) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} ids, more than {name}'s vocabulary {shape['vocab_size']}")
    cfg = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 1.2B parameters
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    stamp.write_text(json.dumps(shape))
    print(f"[train_throughput] built {name}: {n / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s -> {out}",
          flush=True)
    return out


def build_shards(root: Path, n: int, seed: int = 0) -> Path:
    """Synthetic stage-1 shards with captions of 60-124 bytes; reuse when at least ``n`` samples exist."""
    from anisogen.train.synthetic import make_items, write_caption_shards

    out = root / "shards"
    stamp = root / "shards.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("n", 0) >= n:
        return out
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(seed)
    items = make_items(n, d=EMB_DIM, seed=seed)
    for it in items:
        target = rng.randint(60, 124)
        cap = it["caption"]
        while len(cap) < target:
            cap += " " + rng.choice(FILLERS)
        it["caption"] = cap[:target].rstrip()
    write_caption_shards(out, items, samples_per_shard=256)
    stamp.write_text(json.dumps({"n": n, "dim": EMB_DIM}))
    return out


# ------------------------------------------------------------------------------------------------ runs
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, nproc: int, mixed_precision: str, model_dir: Path, shards: Path, out: Path,
                   a: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "docs" / "accelerate" / LAUNCHERS[launcher]),
           "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(free_port()),
           "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    cmd += [str(REPO / "pipelines" / "train.py"),
            "--train-shards", str(shards), "--lm", str(model_dir), "--output-dir", str(out),
            "--projector", PROJECTOR, "--method", "projector",
            "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
            "--mixed-precision", mixed_precision, "--num-workers", str(a.num_workers),
            "--shuffle-buffer", "256", "--max-length", "256", "--log-every", "1", "--no-progress", "--no-resume",
            "--eval-every", "0", "--keep-checkpoints", "1", "--seed", "0"]
    return cmd + list(a.train_arg)


def _stop_group(proc: subprocess.Popen) -> None:
    """End the process group this script started for ``proc`` (the launcher and its ranks)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(cmd: list[str], log_path: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output to ``log_path``; end the group on timeout, and also
    when this script itself gets SIGTERM/SIGINT (e.g. from an outer ``timeout``), so no rank is left behind."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                                start_new_session=True)

        def on_signal(signum, _frame):
            _stop_group(proc)
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            rc = None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return rc, time.perf_counter() - t0


def error_summary(path: Path, n: int = 12) -> str:
    """The first exception line in a run's log (the root cause, before the launcher's own traceback)
    followed by the log's last ``n`` lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    pattern = re.compile(r"^(\[rank\d+\]:\s*)?[A-Za-z_.]*(Error|Exception|Interrupt)\b.*")
    first = next((ln for ln in lines if pattern.match(ln)), None)
    return "\n".join(([first, "..."] if first else []) + lines[-n:])


def summarise(metrics: Path, shape: dict, seqs_per_step: int, warmup: int) -> dict:
    """Throughput and FLOPs over the steps after ``warmup`` (all steps if fewer remain)."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r.get("type") == "train"]
    if not recs:
        raise RuntimeError(f"{metrics}: no train records")
    kept = [r for r in recs if r["step"] > warmup] or recs
    step_s = sum(r["step_s"] for r in kept)
    targets = [r["tokens_per_s"] * r["step_s"] for r in kept]
    inputs = [r["input_tokens_per_s"] * r["step_s"] for r in kept]
    flops = [step_flops(shape, i, t, seqs_per_step) for i, t in zip(inputs, targets)]
    total = sum(f["total"] for f in flops)
    row = {
        "steps_logged": len(recs), "steps_measured": len(kept), "warmup_skipped": len(recs) - len(kept),
        "step_s": step_s / len(kept),
        "tokens_per_s": sum(targets) / step_s,
        "input_tokens_per_s": sum(inputs) / step_s,
        "mean_input_tokens_per_seq": sum(inputs) / (len(kept) * seqs_per_step),
        "flops_per_step": total / len(kept),
        "flops_split": {k: sum(f[k] for f in flops) / total for k in ("decoder", "lm_head", "attention", "projector")},
        "achieved_tflops": total / step_s / 1e12,
    }
    if all("data_wait_s" in r for r in kept):
        row["stall_fraction"] = sum(r["data_wait_s"] for r in kept) / step_s
    return row


def run_one(model: str, launcher: str, a: argparse.Namespace, work: Path, shards: Path, device: dict) -> dict:
    shape = MODELS[model]
    row = {"model": model, "launcher": launcher, "num_processes": a.num_processes, "batch_size": a.batch_size,
           "grad_accum": a.grad_accum, "steps": a.steps, "mixed_precision": a.mixed_precision,
           "device": device["name"], "params": total_params(shape),
           "decoder_matmul_params": decoder_matmul_params(shape)}
    if launcher != "ddp" and not device["cuda"]:
        return row | {"status": "skipped", "error": f"--launcher {launcher} needs CUDA GPUs"}
    t0 = time.perf_counter()
    try:
        model_dir = build_model_dir(model, work)
    except Exception as e:  # noqa: BLE001 - recorded, the other runs go on
        return row | {"status": "failed", "error": f"building the model: {type(e).__name__}: {e}"}
    row["build_s"] = time.perf_counter() - t0
    out = work / "runs" / f"{model}-{launcher}-{a.num_processes}"
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(launcher, a.num_processes, a.mixed_precision, model_dir, shards, out, a)
    log = work / "runs" / f"{out.name}.log"
    print(f"[train_throughput] {model} / {launcher} x{a.num_processes}: {' '.join(cmd)}", flush=True)
    rc, wall = run_process(cmd, log, a.run_timeout)
    row["wall_s"] = wall
    row["log"] = str(log)
    metrics = out / "metrics.jsonl"
    seqs = a.batch_size * a.grad_accum * a.num_processes  # sequences per optimizer step, all ranks
    if rc != 0:
        status = "timeout" if rc is None else "failed"
        row |= {"status": status, "returncode": rc, "error": error_summary(log)}
        if metrics.is_file():  # a run that failed late (e.g. at the final checkpoint) still logged its steps
            try:
                row["partial"] = with_mfu(summarise(metrics, shape, seqs, a.warmup_steps), a, device)
            except Exception:  # noqa: BLE001
                pass
        return row
    try:
        row |= with_mfu(summarise(metrics, shape, seqs, a.warmup_steps), a, device)
    except Exception as e:  # noqa: BLE001
        return row | {"status": "failed", "error": f"reading {metrics}: {type(e).__name__}: {e}\n{error_summary(log)}"}
    row["status"] = "ok"
    return row


def with_mfu(fig: dict, a: argparse.Namespace, device: dict) -> dict:
    peak = peak_flops_per_gpu(device["name"] if device["cuda"] else None, a.mixed_precision, a.peak_tflops)
    fig["peak_tflops_total"] = peak * a.num_processes / 1e12 if peak else None
    fig["mfu"] = fig["achieved_tflops"] * 1e12 / (peak * a.num_processes) if peak else None
    return fig


# ------------------------------------------------------------------------------------------- reporting
def markdown(rows: list[dict], a: argparse.Namespace, device: dict) -> str:
    head = (f"Device: {device['name']}; torch {torch.__version__}; stage 1 (`projector`, `{PROJECTOR}`, frozen LM), "
            f"mixed precision {a.mixed_precision}, batch {a.batch_size} x grad-accum {a.grad_accum} per process, "
            f"{a.steps} steps (first {a.warmup_steps} skipped), random-weight LMs, byte-level tokenizer.\n\n")
    return head + results_table(rows)


def results_table(rows: list[dict], *, elapsed: bool = False) -> str:
    """Markdown table of result rows; a run that failed after its steps still shows its figures
    (under ``partial``). ``elapsed`` adds the wall seconds of each run (the GPU suite's column)."""
    cols = ["model", "launcher", "procs", "status"] + (["elapsed s"] if elapsed else []) + [
        "s/step", "target tok/s", "input tok/s", "tokens/seq", "TFLOP/s", "MFU", "stall"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        fig, status = (r, "ok") if r.get("status") == "ok" else (r.get("partial"), r.get("status"))
        lead = [r["model"], r["launcher"], str(r.get("num_processes", 1))]
        extra = [str(r.get("elapsed_s"))] if elapsed else []
        if fig:
            if status != "ok":
                status += f" after {fig['steps_logged']} steps"
            mfu = f"{fig['mfu']:.1%}" if fig.get("mfu") is not None else "-"
            stall = f"{fig['stall_fraction']:.1%}" if fig.get("stall_fraction") is not None else "-"
            cells = lead + [status] + extra + [
                f"{fig['step_s']:.4f}", f"{fig['tokens_per_s']:,.0f}", f"{fig['input_tokens_per_s']:,.0f}",
                f"{fig['mean_input_tokens_per_seq']:.1f}", f"{fig['achieved_tflops']:.2f}", mfu, stall]
        else:
            cells = lead + [str(status)] + extra + ["-"] * 7
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def device_info() -> dict:
    if torch.cuda.is_available():
        return {"cuda": True, "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"cuda": False, "name": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "count": 0}


def split_list(s: str, allowed) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; choose from {sorted(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,1b", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--launcher", default="ddp", help=f"comma-separated, from {sorted(LAUNCHERS)}")
    p.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) per run")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (--max-steps)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the figures")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch size per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per rank (default 4 on CUDA, 0 on CPU)")
    p.add_argument("--mixed-precision", choices=["bf16", "no"], default=None, help="default: bf16 on CUDA, no on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device (overrides the table)")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds before one run is killed")
    p.add_argument("--workdir", help="cache for models, shards and runs (default: a temporary folder, removed)")
    p.add_argument("--out", help="write all rows as JSON here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for pipelines/train.py (repeatable, e.g. --train-arg=--grad-checkpointing)")
    a = p.parse_args(argv)
    models = split_list(a.models, MODELS)
    launchers = split_list(a.launcher, LAUNCHERS)
    device = device_info()
    if a.mixed_precision is None:
        a.mixed_precision = "bf16" if device["cuda"] else "no"
    if a.num_workers is None:
        a.num_workers = 4 if device["cuda"] else 0
    if device["cuda"] and a.num_processes > device["count"]:
        raise SystemExit(f"--num-processes {a.num_processes} > {device['count']} visible GPUs")

    tmp = None
    if a.workdir:
        work = Path(a.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="train_throughput_")
        work = Path(tmp)
    rows = []
    try:
        n_samples = max(512, a.batch_size * a.grad_accum * a.num_processes * (a.steps + 2))
        shards = build_shards(work, n_samples)
        for model in models:
            for launcher in launchers:
                row = run_one(model, launcher, a, work, shards, device)
                rows.append(row)
                print(json.dumps(row, default=float), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = markdown(rows, a, device)
    print(table, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "argv": sys.argv[1:],
                                           "rows": rows}, indent=1, default=float))
    if a.markdown:
        Path(a.markdown).write_text(table)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
