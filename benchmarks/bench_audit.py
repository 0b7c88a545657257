#!/usr/bin/env python
"""Time the geometry audit end to end, by stage, and its kNN search against a naive torch baseline.

    nice python benchmarks/bench_audit.py --n 100000 --dim 512 --k 20
    python benchmarks/bench_audit.py --n 1000000 --no-compare --workdir /tmp/bench_audit_1m   # the 1M target

1. Builds N substitutes (a ReAlign aligner applied to N synthetic texts, written as fp16 shards with
   src.npy through anisogen.shards) and N unpaired synthetic images (.npy), d = --dim.
2. Runs the audit (``run_audit`` with the audit's defaults unless flags say otherwise) and prints its per-stage
   seconds (scan, moments, knn, metrics, plots, html), the scan's steps summed over tasks (read, sha256,
   moments) and the kNN index it chose (IVF nlist / calibrated nprobe / measured recall). Above 100k rows the
   synthetic world is tiled with noise (see ``make_data``).
3. On the pooled set X ∪ Z (2N rows) times, on the same --compare-queries query rows (self excluded):
   FAISS exact IndexFlatIP, FAISS IVF with the audit's nlist/nprobe, and a naive chunked
   ``torch.cdist`` + ``topk``; prints wall and process-CPU seconds, queries/s, the ratios, and the recall of
   each against exact search. (CPU seconds are printed because a shared machine inflates wall time; the
   ratios are computed on wall time, all in the same run.)

With ``--workdir`` an existing shard folder + images.npy there (from an earlier run with the same --n,
--dim and seed) is reused instead of being written again; the arrays are regenerated deterministically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from anisogen.align import fit_aligner
from anisogen.audit import AuditConfig, run_audit, write_embeddings_npy
from anisogen.audit.index import build_ivf, default_nlist, recall_at_k
from anisogen.geometry import drop_self
from anisogen.audit.defaults import LIMIT, MAX_QUERIES, VERIFY, VERIFY_MODES
from anisogen.audit.workers import default_workers
from anisogen.shards import writer
from anisogen.shards.schema import encode_embedding, fingerprint
from anisogen.synthetic import make_paired_embeddings

MODEL = "bench|synthetic|sha256=0000000000000000"


def write_shards(out: Path, emb: np.ndarray, src: np.ndarray, aligner, per_shard: int = 10_000) -> Path:
    """A generator-format shard folder (fp16 emb + src, txt, json) via anisogen.shards.writer.write_task_shard."""
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for task, start in enumerate(range(0, len(emb), per_shard)):
        stop = min(len(emb), start + per_shard)
        n = stop - start
        rows = np.arange(start, stop)
        entry = writer.write_task_shard(
            out, task, rows_in_task=np.arange(n), texts=[f"caption {r}" for r in rows.tolist()],
            emb=encode_embedding(emb[start:stop]), ids=[str(r) for r in rows.tolist()], rows=rows,
            n_tokens=np.full(n, 12), truncated=np.zeros(n, bool), model=MODEL, aligner=aligner.name,
            src=encode_embedding(src[start:stop]))
        rec = {**entry, "rows": [start, stop], "rejects": 0, "reject_reasons": {}, "reject_list": [], "stats": {}}
        writer.write_record(out, rec)
        records[task] = rec
    aligner.save(out / "aligner")
    cfg = {"bench": True}
    header = {"config": cfg, "config_fingerprint": fingerprint(cfg), "model_fingerprint": MODEL,
              "aligner": {"name": aligner.name, "fingerprint": fingerprint(aligner.config())}, "dim": emb.shape[1],
              "dtype": "fp16", "keep_source": True, "samples_per_shard": per_shard, "num_tasks": len(records),
              "input_rows": len(emb)}
    writer.assemble(out, header, records, complete=True)
    return out


def make_data(n: int, d: int, base: int = 100_000):
    """``n`` images, ``n`` texts (unpaired rows) and 10% extra pairs for the aligner fit. Above ``base`` rows the
    synthetic world is tiled: copy c of a row gets seeded Gaussian noise (std 0.05/sqrt(d) per coordinate) and is
    renormalised, so memory stays O(base) float64 while every row is distinct."""
    m = min(n, base)
    pairs = make_paired_embeddings(2 * m + 2 * (m // 10), d, seed=0)
    order = np.random.default_rng(0).permutation(len(pairs.image))
    img0, txt0 = pairs.image[order[:m]].astype(np.float32), pairs.text[order[m : 2 * m]].astype(np.float32)
    fit_t, fit_i = pairs.text[order[2 * m :]], pairs.image[order[2 * m :]]
    rng = np.random.default_rng(1)

    def tile(x0):
        out = np.empty((n, d), dtype=np.float32)
        for c, s in enumerate(range(0, n, m)):
            block = x0[: min(m, n - s)]
            if c:
                block = block + rng.standard_normal(block.shape, dtype=np.float32) * (0.05 / np.sqrt(d))
                block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[s : s + len(block)] = block
        return out

    return tile(img0), tile(txt0), fit_t, fit_i


def naive_torch_knn(base: np.ndarray, rows: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Self-excluded kNN of base[rows] in base by chunked torch.cdist (Euclidean) + topk (smallest)."""
    b = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
    out = np.empty((len(rows), k), dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(rows), chunk):
            q = b[torch.from_numpy(rows[s : s + chunk])]
            ids = torch.topk(torch.cdist(q, b), k + 1, dim=1, largest=False).indices.numpy()
            out[s : s + len(q)] = drop_self(ids, rows[s : s + chunk], k)
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def timed_cpu(fn):
    """(result, wall seconds, process CPU seconds over all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def scan_compare(shards: Path, workers: int) -> None:
    """Time ``load_shard_folder`` (the audit's scan of one folder) per --verify mode and pool size."""
    from anisogen.audit.loading import load_shard_folder
    from anisogen.audit.workers import TaskPool

    print(f"\n## scan of {shards.name} alone (load_shard_folder, --limit {LIMIT}), side by side")
    rows = []
    for n_workers in sorted({1, workers}):
        for verify in ("none", "sample", "full"):
            with TaskPool(n_workers) as pool:
                got, secs, cpu = timed_cpu(lambda: load_shard_folder(shards, max_samples=LIMIT, verify=verify,
                                                                     pool=pool))
            rows.append((n_workers, verify, secs, got.n_total, got.seconds))
    ref = next(secs for w, v, secs, _, _ in rows if w == workers and v == VERIFY)
    print(f"  {'workers':>7s} {'verify':>7s} {'wall s':>8s} {'rows/s':>10s} {'vs default':>10s}  steps (CPU s summed)")
    for w, v, secs, n_rows, steps in rows:
        print(f"  {w:7d} {v:>7s} {secs:8.2f} {n_rows / secs:10.0f} {secs / ref:9.2f}x  "
              + ", ".join(f"{k} {x:.1f}" for k, x in sorted(steps.items())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="substitutes and images each (default 100000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--max-queries", type=int, default=MAX_QUERIES,
                   help=f"the audit's --max-queries: kNN query rows scored per set (default {MAX_QUERIES}; 0 = all)")
    p.add_argument("--limit", type=int, default=LIMIT,
                   help=f"the audit's --limit: rows per set in the kNN/cosine sample (default {LIMIT}; 0 = all)")
    p.add_argument("--verify", default=VERIFY, choices=VERIFY_MODES, help=f"the audit's --verify (default {VERIFY})")
    p.add_argument("--workers", type=int, default=None, help="the audit's --workers (default: one per CPU, max 8)")
    p.add_argument("--no-compare", action="store_true", help="skip the FAISS-vs-torch kNN comparison")
    p.add_argument("--scan-compare", action="store_true",
                   help="also time the shard-folder scan alone for --verify none/sample/full x --workers 1/default, "
                        "side by side, with ratios to the default (sample, default workers)")
    p.add_argument("--compare-queries", type=int, default=20_000,
                   help="pooled rows queried in the FAISS-vs-torch comparison (default 20000; 0 = all 2N)")
    p.add_argument(
        "--index", default="auto", choices=["auto", "flat", "ivf"], help="the audit's --index (default auto)"
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads for FAISS and torch (default 2)")
    p.add_argument("--workdir", default=None, help="where to write the shards and report (default: a temp dir)")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_audit_"))
    work.mkdir(parents=True, exist_ok=True)
    n, d, k = args.n, args.dim, args.k
    print(f"bench_audit: N = {n} substitutes vs {n} images, d = {d}, k = {k}, threads = {args.threads}, work = {work}")

    t0 = time.perf_counter()
    shards = work / "shards_realign"
    reuse = (shards / "manifest.json").is_file() and (work / "images.npy").is_file() and \
        np.load(work / "images.npy", mmap_mode="r").shape == (n, d)
    if not (reuse and args.no_compare):  # the arrays are needed to write the inputs or for the comparison
        images, texts, fit_t, fit_i = make_data(n, d)
        aligner = fit_aligner("realign", text=fit_t, image=fit_i, seed=0, model_fingerprint=MODEL)
        subs = np.concatenate([aligner.transform(texts[s : s + 100_000]).astype(np.float32)
                               for s in range(0, n, 100_000)])
    if not reuse:
        write_embeddings_npy(work / "images.npy", images.astype(np.float16), model_fingerprint=MODEL, kind="image")
        write_shards(shards, subs, texts, aligner)
    print(f"setup (synthetic data, aligner, {n} samples {'reused from' if reuse else 'written as shards to'} {work}): "
          f"{time.perf_counter() - t0:.1f} s\n")

    workers = default_workers() if args.workers is None else args.workers
    cfg = AuditConfig(shards=[str(shards)], images=str(work / "images.npy"), out=str(work / "report"), k=k,
                      max_samples=args.limit or None, max_queries=args.max_queries or None, index=args.index,
                      progress=True, verify=args.verify, workers=workers)
    report, total, total_cpu = timed_cpu(lambda: run_audit(cfg))
    folder = report["folders"][0]
    info = folder["knn"]["mixing"]
    print(f"\n## audit stages (run_audit, --index {args.index}, --limit {args.limit or 'all'}, --max-queries "
          f"{args.max_queries or 'all'}, --verify {args.verify}, --workers {workers}, N = {n} + {n})")
    for stage, secs in report["timings"].items():
        if stage != "scan_steps":
            print(f"  {stage:<10s} {secs:9.2f} s")
    for label, steps in report["timings"]["scan_steps"].items():
        print(f"  scan steps of {label} (seconds summed over tasks): "
              + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    print(f"  kNN graphs: pooled X∪Z ({info['n_base']} rows): {info['kind']} via {info['backend']}, nlist "
          f"{info['nlist']}, "
          f"nprobe {info['nprobe']}, recall@{k} {info['recall']:.4f} on {info['recall_sample'] or 'all'} queries, "
          f"{info['seconds']:.1f} s (build + calibration {info.get('build_seconds', 0):.1f} s); "
          f"Y and Z self-graphs {folder['knn']['source']['seconds']:.1f} s + "
          f"{folder['knn']['substitute']['seconds']:.1f} s")
    m = folder["metrics"]
    print("  metrics: " + ", ".join(f"{key} {m[key]:.4f}" for key in
                                    ("delta_mu", "G_Sigma", "C_lambda", "O_q", "JS_cos", "M_k_Z", "M_k_X", "Phi", "Psi",
                                     "Omega_k")))

    if args.scan_compare:
        scan_compare(shards, workers)
    if args.no_compare:
        print(f"\ntotal audit {total:.1f} s wall, {total_cpu:.1f} s process CPU (main process only); report in "
              f"{work / 'report'}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return
    pooled = np.vstack([images, subs]).astype(np.float32)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    nq = len(pooled) if args.compare_queries <= 0 else min(args.compare_queries, len(pooled))
    rows = np.sort(np.random.default_rng(1).choice(len(pooled), nq, replace=False))
    print(f"\n## kNN of {nq} pooled queries against all {len(pooled)} pooled rows (k = {k}, self excluded)")
    flat = faiss.IndexFlatIP(d)
    flat.add(pooled)

    def faiss_search(index):
        _, ids = index.search(pooled[rows], k + 1)
        return drop_self(ids, rows, k)

    exact, t_flat, c_flat = timed_cpu(lambda: faiss_search(flat))
    # the audit's own IVF settings; when it chose exact search (small N), default nlist and nlist/16 probes
    nlist = info["nlist"] or default_nlist(len(pooled))
    nprobe = info["nprobe"] or max(1, nlist // 16)
    ivf, t_build = timed(lambda: build_ivf(pooled, nlist=nlist, seed=0, device="cpu")[0])
    ivf.nprobe = nprobe
    approx, t_ivf, c_ivf = timed_cpu(lambda: faiss_search(ivf))
    naive, t_naive, c_naive = timed_cpu(lambda: naive_torch_knn(pooled, rows, k))
    print(
        f"  {'method':<42s} {'wall s':>9s} {'CPU s':>8s} {'queries/s':>10s} {'recall':>7s} {'speed-up vs naive':>18s}"
    )
    for name, secs, cpu, ids in (("naive torch cdist + topk (chunks of 256)", t_naive, c_naive, naive),
                                 ("FAISS IndexFlatIP (exact)", t_flat, c_flat, exact),
                                 (f"FAISS IVF{nlist},Flat nprobe {nprobe} (search)", t_ivf, c_ivf, approx)):
        print(f"  {name:<42s} {secs:9.2f} {cpu:8.2f} {nq / secs:10.0f} {recall_at_k(ids, exact):7.4f} "
              f"{t_naive / secs:17.1f}x")
    print(f"  (IVF build: train + add of {len(pooled)} rows {t_build:.1f} s, paid once per graph)")
    print(f"\ntotal audit {total:.1f} s wall, {total_cpu:.1f} s process CPU; report in {work / 'report'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
