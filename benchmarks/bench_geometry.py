#!/usr/bin/env python
"""Time gap_report and method_report (and their parts) on synthetic unit embeddings.

    python benchmarks/bench_geometry.py --n 100000 --dim 512 --k 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from anisogen.geometry import gap_report, knn_search, method_report
from anisogen.synthetic import make_paired_embeddings


def timed(label, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label:<40s} {time.perf_counter() - start:8.2f} s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="paired rows (default 100000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    args = p.parse_args()
    pairs = timed("generate synthetic pairs", lambda: make_paired_embeddings(args.n, args.dim, seed=0))
    z = pairs.text + 0.05 * np.random.default_rng(0).standard_normal(pairs.text.shape)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    timed(f"gap_report (N={args.n}, d={args.dim})", lambda: gap_report(image=pairs.image, text=pairs.text))
    timed(f"one exact kNN self-search (N={args.n})", lambda: knn_search(pairs.text, k=args.k))
    timed(f"method_report (N={args.n}, k={args.k})",
          lambda: method_report(image=pairs.image, text=pairs.text, substitute=z, k=args.k))


if __name__ == "__main__":
    main()
