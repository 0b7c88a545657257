#!/usr/bin/env python
"""Aligner apply throughput: the float64 NumPy ``transform`` against the float32 torch ``device_transform``.

Fits AnisoAlign at d = 512 on synthetic unit embeddings with realistic shapes (default rank r = 2 round(d/20),
default networks and selection, but only a few training steps: throughput depends on the shapes, not on
how well the networks are trained) and ReAlign, then measures rows/s of both paths side by side, interleaved
over ``--rounds`` rounds (the median round is reported). For the device path it also reports the achieved
GFLOP/s, counted analytically from the matmul shapes per row, as a fraction of the GFLOP/s of a same-run
fp32 ``torch.mm`` of shape (block, d) @ (d, d). Target (issue): >= 30 % of that GEMM rate; the float64
reference does 10-12k rows/s at d = 512.

FLOPs per row (2 per multiply-add): projection y -> [c_p | v0] 2 d (r + d); refiner layers 2 (3m + d) h, then
2 h h per further layer; head 2 h (2m [+ d]); with a Delta-v head, the V projections 4 d r (8 d r with
``reproject_v``); back-projection 2 r d; residual (+ v_hat) d. ReAlign: 2 d (one multiply-add per coordinate).

Configurations (``--configs``): ``anisoalign`` (the default fit: automatic selection, which may pick a map
without refiner), ``anisoalign-refined`` (fixed settings that keep the refiner: ``select="none"``),
``anisoalign-paper`` (refiner with the Delta-v head), ``realign``.

    python benchmarks/bench_align_device.py                       # CPU, 1 thread
    python benchmarks/bench_align_device.py --device cuda --threads 16 --rows 262144 --block 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _threads_from_argv(argv: list[str]) -> int:
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", type=int, default=1)
    return early.parse_known_args(argv)[0].threads


# NumPy's OpenBLAS reads its thread count when it is loaded: the float64 reference gets --threads too
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(_threads_from_argv(sys.argv[1:]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anisogen.align import fit_aligner  # noqa: E402
from anisogen.report import markdown_table  # noqa: E402
from anisogen.synthetic import make_paired_embeddings  # noqa: E402

FEW_STEPS = {"stage1_steps": 40, "stage1_eval_every": 20, "stage1_patience": None, "stage2_steps": 40,
             "stage2_min_steps": 1, "eval_every": 20, "max_train_samples": 20000}
CONFIGS = {
    "anisoalign": ("anisoalign", FEW_STEPS),
    "anisoalign-refined": ("anisoalign", {**FEW_STEPS, "select": "none", "shrinkage": [0.5, 0.25]}),
    "anisoalign-paper": ("anisoalign-paper", FEW_STEPS),
    "realign": ("realign", {}),
}


def flops_per_row(aligner) -> int:
    """Matmul FLOPs of one row of the device path (module docstring), from the fitted shapes."""
    d = aligner.dim
    if not aligner.name.startswith("anisoalign"):
        return 2 * d
    r = aligner.frame.rank
    total = 2 * d * (r + d) + 2 * r * d + d
    net = aligner.refiner
    if net is not None:
        for i in range(0, len(net.body), 3):
            linear = net.body[i]
            total += 2 * linear.in_features * linear.out_features
        total += 2 * net.head.in_features * net.head.out_features
        if net.with_v:
            total += (8 if aligner.bounds.reproject_v else 4) * d * r
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(device: torch.device, block: int, d: int, reps: int) -> float:
    a = torch.randn(block, d, device=device)
    b = torch.randn(d, d, device=device)
    out = torch.empty(block, d, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    sync(device)
    return 2.0 * block * d * d * reps / (time.perf_counter() - start) / 1e9


def describe(aligner) -> str:
    if not aligner.name.startswith("anisoalign"):
        return "-"
    net = aligner.refiner
    parts = [f"r={aligner.frame.rank}", f"gamma=({aligner.init.shrinkage:g},{aligner.init.shrinkage_v:g})"]
    if net is None:
        parts.append("no refiner")
    else:
        parts.append(f"refiner {len(net.body) // 3}x{net.head.in_features}" + (" +dv" if net.with_v else ""))
    return " ".join(parts)


def measure(name: str, aligner, text: np.ndarray, device: torch.device, rounds: int, gemm_reps: int,
            block: int | None) -> dict:
    x = torch.from_numpy(text).to(device)
    dt = aligner.device_transform(device, block=block)
    with torch.inference_mode():
        dt(x[: dt.block])  # warm-up: allocator, kernels
        sync(device)
    aligner.transform(text[:1024])
    ref_s, dev_s, gemm = [], [], []
    for _ in range(rounds):  # interleaved: reference, device, GEMM, in every round
        start = time.perf_counter()
        aligner.transform(text)
        ref_s.append(time.perf_counter() - start)
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            dt(x)
            sync(device)
        dev_s.append(time.perf_counter() - start)
        gemm.append(gemm_gflops(device, dt.block, aligner.dim, gemm_reps))
    n = len(text)
    ref_rate, dev_rate = n / statistics.median(ref_s), n / statistics.median(dev_s)
    flops = flops_per_row(aligner)
    gflops = dev_rate * flops / 1e9
    gemm_rate = statistics.median(gemm)
    return {"config": name, "map": describe(aligner), "rows": n, "block": dt.block, "numpy_f64_rows_s": ref_rate,
            "device_f32_rows_s": dev_rate, "speedup": dev_rate / ref_rate, "mflop_per_row": flops / 1e6,
            "device_gflop_s": gflops, "gemm_gflop_s": gemm_rate, "gemm_fraction": gflops / gemm_rate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device of the device path (default cpu; 'cuda')")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads and NumPy's BLAS threads (default 1)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--rank", type=int, default=None, help="AnisoAlign r (default: the aligner's, 2 round(d/20))")
    p.add_argument("--fit-rows", type=int, default=12000, help="texts (= images) to fit on (default 12000)")
    p.add_argument("--rows", type=int, default=16384, help="texts transformed per round (default 16384)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported (default 5)")
    p.add_argument("--gemm-reps", type=int, default=20, help="GEMM repetitions per round (default 20)")
    p.add_argument("--block", type=int, default=None,
                   help="rows per fixed-shape block of the device path (default: the aligner's, 1024); the "
                        "GEMM reference uses the same row count")
    p.add_argument("--configs", nargs="+", default=["anisoalign", "anisoalign-refined", "realign"],
                   choices=sorted(CONFIGS), help="what to measure")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    pairs = make_paired_embeddings(2 * args.fit_rows + args.rows, args.dim, seed=0)
    fit_text = pairs.text[: args.fit_rows].astype(np.float32)
    fit_image = pairs.image[args.fit_rows : 2 * args.fit_rows].astype(np.float32)
    text = np.ascontiguousarray(pairs.text[2 * args.fit_rows :], dtype=np.float32)
    del pairs
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(f"device {where}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); d = {args.dim}, "
          f"fit on {args.fit_rows} texts + {args.fit_rows} images, {args.rows} rows per round, "
          f"{args.rounds} rounds", flush=True)
    rows = []
    for config in args.configs:
        name, params = CONFIGS[config]
        params = dict(params, threads=args.threads) if name.startswith("anisoalign") else dict(params)
        if args.rank is not None and name.startswith("anisoalign"):
            params["rank"] = args.rank
        start = time.perf_counter()
        aligner = fit_aligner(name, text=fit_text, image=fit_image, seed=0, **params)
        print(f"{config}: fitted in {time.perf_counter() - start:.1f}s ({describe(aligner)})", flush=True)
        row = measure(config, aligner, text, device, args.rounds, args.gemm_reps, args.block)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["map", "block", "numpy_f64_rows_s", "device_f32_rows_s", "speedup", "mflop_per_row", "device_gflop_s",
            "gemm_gflop_s", "gemm_fraction"]
    print()
    print(markdown_table(rows, cols, first="config", digits=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
