"""Geometry audit of generated shards against image embeddings: report.json, report.html, gates for CI.

    anisogen-audit --shards out/realign --shards out/aniso --images images.npy \\
        [--paired heldout.npz] --out audit/ --fail-if "delta_mu>0.05" --fail-if "M_k_Z<0.3"

Inputs: each --shards is a folder written by pipelines/generate.py (manifest.json + shard-*.tar);
--images is a .npy (N, d) file (optional fingerprint sidecar <stem>.json), a folder of .npy files or an
image-embedding shard folder; --paired is an .npz with arrays `image` and `text` (or a folder with
image.npy and text.npy) of the same items. Metric definitions, file formats and exit codes: docs/AUDIT.md.

Exit status: 0 = audit written and every gate passed; 1 = audit written but a --fail-if gate failed;
2 = bad input or usage (message names the file / shard / sample); nothing is written as complete then.
"""

from __future__ import annotations

import argparse
import sys

from anisogen.audit.defaults import (
    DEVICES, KINDS, LIMIT, MAX_QUERIES, METRIC_NAMES, N_PAIRS, N_PERMUTATIONS, RECALL_SAMPLE, RECALL_TARGET, VERIFY,
    VERIFY_MODES,
)
from anisogen.cli import add_deprecated_alias, console_script


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--shards", action="append", required=True, metavar="DIR",
                    help="generated shard folder to audit; repeat to compare several side by side (e.g. one per "
                         "aligner)")
    io.add_argument("--labels", nargs="+", metavar="NAME",
                    help="display names for the --shards folders, in order (default: folder names)")
    io.add_argument("--images", required=True, metavar="PATH",
                    help="image embeddings: .npy (N, d), a folder of .npy files, or an image-embedding shard folder")
    io.add_argument("--paired", metavar="PATH",
                    help="paired evaluation set (.npz with 'image' and 'text', or a folder with image.npy and "
                         "text.npy); enables the full method_report per folder using the folder's aligner/ artifact")
    io.add_argument("--out", required=True, metavar="DIR", help="report folder (report.json, report.html, plots/)")
    samp = p.add_argument_group("sampling")
    add_deprecated_alias(samp, "--max-samples", "--limit", dest="max_samples", type=int)
    samp.add_argument("--limit", dest="max_samples", type=int, default=LIMIT, metavar="N",
                      help="rows per input kept, seeded and uniform, for the sample-based metrics (kNN, pairwise "
                           f"cosines, PCA, Phi/Psi/Omega_k; default {LIMIT}; 0 = all). Moments (delta_mu, G_Sigma, "
                           "C_lambda, O_q, spectra) and norm statistics always cover every row")
    samp.add_argument("--paired-max-samples", type=int, default=10_000, metavar="N",
                      help="seeded sample cap for the paired set (default 10000; 0 = all)")
    samp.add_argument("--seed", type=int, default=0, help="seed for sampling, pairs, permutations, IVF (default 0)")
    samp.add_argument("--verify", choices=VERIFY_MODES, default=VERIFY,
                      help="full = sha256 + size + count of every shard and every member of every sample checked; "
                           "sample = size + count of every shard, every emb.npy checked, sha256 of a seeded 1/16 "
                           "of the shards, src.npy/json of the sampled rows; none = no size/sha256 checks (counts "
                           f"and every emb.npy are still checked). Default {VERIFY}; see docs/AUDIT.md")
    samp.add_argument("--workers", type=int, default=None, metavar="N",
                      help="processes scanning shards and .npy row ranges in parallel (default: one per CPU, at "
                           "most 8; 1 = in this process)")
    samp.add_argument("--skip-corrupt", action="store_true",
                      help="skip missing/corrupt shards and bad samples (listed in rejects.jsonl and the report) "
                           "instead of stopping")
    met = p.add_argument_group("metrics")
    met.add_argument("--k", type=int, default=20, help="neighbourhood size for M_k and Omega_k (default 20)")
    met.add_argument("--q", type=int, default=None, help="subspace size for O_q (default round(d/10))")
    met.add_argument("--n-pairs", type=int, default=N_PAIRS,
                     help=f"random pairs for Psi and the pairwise-cosine JS divergence (default {N_PAIRS})")
    met.add_argument("--n-permutations", type=int, default=N_PERMUTATIONS,
                     help=f"label permutations normalising M_k (default {N_PERMUTATIONS})")
    met.add_argument("--max-queries", type=int, default=MAX_QUERIES, metavar="N",
                     help="score the kNN metrics (M_k, NN-is-image, Omega_k) on a seeded sample of at most N query "
                          "rows per set; neighbours are searched among all --limit rows of the sample "
                          f"(default {MAX_QUERIES}; 0 = every row)")
    met.add_argument("--source-baseline", action="store_true",
                     help="also audit the raw source text embeddings (src.npy) as a reference row")
    knn = p.add_argument_group("neighbour search (FAISS)")
    knn.add_argument("--index", choices=KINDS, default="auto",
                     help="flat = exact IndexFlatIP; ivf = IndexIVFFlat with measured recall; auto = flat when "
                          "queries x rows <= 50k x 50k or on GPU, ivf above (default auto)")
    knn.add_argument("--device", choices=DEVICES, default="auto",
                     help="cuda uses faiss-gpu if installed, else torch matmul+topk; auto = cuda when available")
    knn.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(N))")
    knn.add_argument("--nprobe", type=int, default=None,
                     help="IVF lists probed; default: calibrated until --recall-target is reached")
    knn.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                     help=f"recall@k the IVF nprobe calibration must reach (default {RECALL_TARGET})")
    knn.add_argument("--recall-sample", type=int, default=RECALL_SAMPLE,
                     help=f"queries used to measure IVF recall against exact search (default {RECALL_SAMPLE})")
    knn.add_argument(
        "--threads", type=int, default=None, help="CPU threads for FAISS and torch (default: library default)"
    )
    gate = p.add_argument_group("gates")
    gate.add_argument("--fail-if", action="append", default=[], metavar="RULE",
                      help='exit 1 if RULE holds for any folder, e.g. "delta_mu>0.05" or "M_k_Z<0.3"; repeatable. '
                           f"Metrics: {', '.join(METRIC_NAMES)}")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help="no progress output on stderr")
    add_deprecated_alias(p, "--quiet", "--no-progress", dest="quiet", const=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from anisogen.audit import AuditConfig, AuditInputError, GateError, run_audit
    from anisogen.audit.workers import default_workers
    from anisogen.audit.html import PAIRED_COLUMNS, TABLE_COLUMNS
    from anisogen.report import markdown_table

    if args.threads:
        import faiss
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    cfg = AuditConfig(
        shards=args.shards, images=args.images, out=args.out, paired=args.paired, labels=args.labels,
        max_samples=args.max_samples or None, paired_max_samples=args.paired_max_samples or None,
        max_queries=args.max_queries or None, seed=args.seed,
        k=args.k, q=args.q, index=args.index, device=args.device, nlist=args.nlist, nprobe=args.nprobe,
        recall_target=args.recall_target, recall_sample=args.recall_sample, n_pairs=args.n_pairs,
        n_permutations=args.n_permutations, skip_corrupt=args.skip_corrupt, source_baseline=args.source_baseline,
        fail_if=args.fail_if, progress=not args.quiet, verify=args.verify,
        workers=default_workers() if args.workers is None else args.workers,
    )
    try:
        report = run_audit(cfg)
    except (AuditInputError, GateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [{"name": r["label"], **r["metrics"]} for r in report["folders"]]
    for n_table, columns in enumerate((TABLE_COLUMNS, PAIRED_COLUMNS)):
        shown = [r for r in rows if any(c in r for c in columns)]  # e.g. the paired-only reference row
        if shown:
            print("\n" * min(n_table, 1) + markdown_table(shown, [c for c in columns if any(c in r for r in shown)]))
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if report["skipped_total"]:
        print(f"warning: {report['skipped_total']} shard(s)/sample(s) skipped, see {args.out}/rejects.jsonl",
              file=sys.stderr)
    print(f"\nreport: {args.out}/report.html, {args.out}/report.json")
    gates = report["gates"]
    for failure in gates["failures"]:
        print(failure["message"], file=sys.stderr)
    if not gates["passed"]:
        return 1
    if gates["rules"]:
        print(f"all {len(gates['rules'])} gate(s) passed")
    return 0


entry = console_script(main)
