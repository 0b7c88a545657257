#!/usr/bin/env python
"""Time the geometry audit end to end, by stage, and its kNN search against a naive torch baseline.

    nice python benchmarks/bench_audit.py --n 100000 --dim 512 --k 20

1. Builds N substitutes (a ReAlign aligner applied to N synthetic texts, written as fp16 shards with
   src.npy through anisogen.shards) and N unpaired synthetic images (.npy), d = --dim.
2. Runs the audit (``run_audit``, --index auto, --max-queries) and prints its per-stage seconds (load, moments, knn,
   metrics, plots, html) and the kNN index it chose (IVF nlist / calibrated nprobe / measured recall).
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
from anisogen.shards import make_key, writer
from anisogen.shards.schema import encode_embedding, fingerprint, sample_members
from anisogen.synthetic import make_paired_embeddings

MODEL = "bench|synthetic|sha256=0000000000000000"


def write_shards(out: Path, emb: np.ndarray, src: np.ndarray, aligner, per_shard: int = 10_000) -> Path:
    """A generator-format shard folder (fp16 emb + src) via anisogen.shards.writer."""
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for task, start in enumerate(range(0, len(emb), per_shard)):
        e = encode_embedding(emb[start : start + per_shard])
        s = encode_embedding(src[start : start + per_shard])

        def samples(task=task, start=start, e=e, s=s):
            for i in range(len(e)):
                meta = {"id": str(start + i), "row": start + i, "n_tokens": 12, "truncated": False, "model": MODEL,
                        "aligner": aligner.name}
                yield sample_members(make_key(task, i), f"caption {start + i}", e[i], meta, s[i])

        entry = writer.write_shard(out, task, samples())
        rec = {**entry, "rows": [start, start + len(e)], "rejects": 0, "reject_reasons": {}, "reject_list": [],
               "stats": {}}
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="substitutes and images each (default 100000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--max-queries", type=int, default=20_000,
                   help="the audit's --max-queries: kNN query rows scored per set (default 20000; 0 = every row)")
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
    pairs = make_paired_embeddings(2 * n + 2 * (n // 10), d, seed=0)
    order = np.random.default_rng(0).permutation(len(pairs.image))
    images = pairs.image[order[:n]].astype(np.float32)
    texts = pairs.text[order[n : 2 * n]]
    fit_t, fit_i = pairs.text[order[2 * n :]], pairs.image[order[2 * n :]]
    aligner = fit_aligner("realign", text=fit_t, image=fit_i, seed=0, model_fingerprint=MODEL)
    subs = aligner.transform(texts)
    shards = work / "shards_realign"
    reuse = (shards / "manifest.json").is_file() and (work / "images.npy").is_file() and \
        np.load(work / "images.npy", mmap_mode="r").shape == (n, d)
    if not reuse:
        write_embeddings_npy(work / "images.npy", images.astype(np.float16), model_fingerprint=MODEL, kind="image")
        write_shards(shards, subs, texts.astype(np.float32), aligner)
    print(f"setup (synthetic data, aligner, {n} samples {'reused from' if reuse else 'written as shards to'} {work}): "
          f"{time.perf_counter() - t0:.1f} s\n")

    cfg = AuditConfig(shards=[str(shards)], images=str(work / "images.npy"), out=str(work / "report"), k=k,
                      max_samples=None, max_queries=args.max_queries or None, index=args.index, progress=True)
    report, total, total_cpu = timed_cpu(lambda: run_audit(cfg))
    folder = report["folders"][0]
    info = folder["knn"]["mixing"]
    print(
        f"\n## audit stages (run_audit, --index {args.index}, --max-queries {args.max_queries or 'all'}, N = {n} + {n})"
    )
    for stage, secs in report["timings"].items():
        print(f"  {stage:<10s} {secs:9.2f} s")
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
