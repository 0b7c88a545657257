#!/usr/bin/env python
"""AnisoAlign cost and quality, measured side by side with the closed-form baselines in one run.

Part 1 (``--scale``): fit time at d = 512, r = 128 on 200k texts + 200k images (synthetic unit embeddings;
the fit never uses pairing) with the default parameters (``cpu`` preset, automatic selection), and the
apply throughput (embeddings/s) of ``transform`` over all texts, next to ReAlign (ratios printed).

Part 2 (``--table``): the §5 method table of every registered aligner (baselines and the five AnisoAlign
variants) on planted-gain synthetic data (:func:`anisogen.synthetic.plant_gain`), fitted on
unpaired halves and scored on held-out pairs.

    python benchmarks/bench_anisoalign.py --scale --table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anisogen.align import ALIGNERS, fit_aligner  # noqa: E402
from anisogen.synthetic import plant_gain  # noqa: E402
from anisogen.align.compare import METHOD_COLUMNS, compare_aligners  # noqa: E402
from anisogen.report import markdown_table  # noqa: E402
from anisogen.synthetic import make_paired_embeddings  # noqa: E402


def scale(args) -> list[dict]:
    t0 = time.perf_counter()
    pairs = make_paired_embeddings(args.n, args.dim, seed=0)
    text, image = pairs.text.astype(np.float32), pairs.image.astype(np.float32)
    del pairs
    print(
        f"data: {len(text)} texts + {len(image)} images, d = {args.dim} ({time.perf_counter() - t0:.1f}s to generate)"
    )
    rows = []
    configs = [("realign", {}), ("anisoalign", {"rank": args.rank, **json.loads(args.params)})]
    for name, params in configs:
        start = time.perf_counter()
        aligner = fit_aligner(name, text=text, image=image, seed=0, device=args.device, progress=args.progress,
                              **params)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        z = aligner.transform(text)
        apply_s = time.perf_counter() - start
        assert z.shape == text.shape
        row = {"name": name, "fit_s": fit_s, "transform_s": apply_s, "emb_per_s": len(text) / apply_s}
        for key, value in aligner.history.items():
            if key.startswith("seconds_"):
                row[key] = value[0]
        for key in ("stage1_L_I_val", "stage2_objective_val"):
            if key in aligner.history:
                row[key + "_first"], row[key + "_last"] = aligner.history[key][0], aligner.history[key][-1]
        for key in ("stage1_steps_run", "stage1_lr_decay_steps", "stage1_L_I_val", "stage1_L_I_val_step"):
            if key in aligner.history:
                row[key] = aligner.history[key]
        if "selection" in aligner.history:
            row["selected"] = next(r["candidate"] for r in aligner.history["selection"] if r["chosen"])
        rows.append(row)
        print(json.dumps(row))
    base, aniso = rows
    print(f"\nfit time ratio anisoalign / realign: {aniso['fit_s'] / base['fit_s']:.1f}x; "
          f"transform throughput ratio realign / anisoalign: {base['emb_per_s'] / aniso['emb_per_s']:.1f}x")
    cols = ["fit_s", "transform_s", "emb_per_s", "seconds_frame_stats_init", "seconds_stage1", "seconds_selection"]
    print(markdown_table(rows, cols, first="name", digits=1))
    return rows


def table(args) -> list[dict]:
    pairs = plant_gain(make_paired_embeddings(args.table_n, args.table_dim, gap=0.4, residual_rank=0, seed=0),
                       gain=args.gain, k=args.gain_rank)
    fit_text, fit_image, held = pairs.split(args.table_n // 2, seed=0, keep_antithetic=True)
    aniso = {"rank": args.table_rank, **json.loads(args.table_params)}
    params = {"c3": {"calibrate_phi": 0.9}, **{n: aniso for n in ALIGNERS if n.startswith("anisoalign")}}
    print(f"planted-gain data: d = {args.table_dim}, gain {args.gain} on the top-{args.gain_rank} content directions; "
          f"fit on {len(fit_text)} texts + {len(fit_image)} images (unpaired), {len(held.text)} held-out pairs; "
          f"AnisoAlign params {aniso}")
    rows = compare_aligners(fit_text=fit_text, fit_image=fit_image, heldout_image=held.image, heldout_text=held.text,
                            params=params, seed=0, k=20, progress=args.progress)
    print(markdown_table(rows, [*METHOD_COLUMNS, "fit_seconds"], first="name"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", action="store_true", help="run part 1 (fit time and throughput at scale)")
    p.add_argument("--table", action="store_true", help="run part 2 (method table on planted-gain data)")
    p.add_argument("--n", type=int, default=200_000, help="part 1: texts (= images) (default 200000)")
    p.add_argument("--dim", type=int, default=512, help="part 1: embedding dimension (default 512)")
    p.add_argument("--rank", type=int, default=128, help="part 1: r = dim U (default 128)")
    p.add_argument("--params", default="{}", help="part 1: extra AnisoAlign params as JSON")
    p.add_argument("--device", default=None, help="torch device for training (default cpu)")
    p.add_argument("--table-n", type=int, default=20000, help="part 2: items (half fit, half held out; default 20000)")
    p.add_argument("--table-dim", type=int, default=64, help="part 2: dimension (default 64)")
    p.add_argument("--table-rank", type=int, default=4, help="part 2: AnisoAlign r (default 4)")
    p.add_argument("--table-params", default="{}", help="part 2: extra AnisoAlign params as JSON")
    p.add_argument("--gain", type=float, default=1.5, help="part 2: planted gain (default 1.5)")
    p.add_argument("--gain-rank", type=int, default=2, help="part 2: number of gained directions (default 2)")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    p.add_argument("--json", help="write all rows to this JSON file")
    args = p.parse_args(argv)
    if not (args.scale or args.table):
        p.error("choose --scale and/or --table")
    out = {}
    if args.scale:
        out["scale"] = scale(args)
    if args.table:
        out["table"] = table(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
