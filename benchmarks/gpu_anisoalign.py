#!/usr/bin/env python
"""GPU check of AnisoAlign fitting (issue 12): one command for a lent GPU machine, about 5-8 minutes.

1. ``--device cuda`` fits run end to end for ``anisoalign`` (auto selection) and ``anisoalign-paper``, give
   unit-norm substitutes, and are reproducible on the device (two fits, same tensors).
2. Fit time of the ``cpu`` and ``paper`` presets at d = 512, r = 128 on 200k + 200k synthetic rows, next to
   ReAlign's fit in the same run (the ratio is what docs/BENCHMARKS.md records), with the Stage-I steps
   actually run and the held-out L_I at the end.

    python benchmarks/gpu_anisoalign.py --out gpu_anisoalign.json

Without CUDA it exits with status 2 and says so (run ``benchmarks/bench_anisoalign.py`` on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anisogen.align import fit_aligner  # noqa: E402
from anisogen.synthetic import make_paired_embeddings, plant_gain  # noqa: E402


def smoke(device: str) -> dict:
    pairs = plant_gain(make_paired_embeddings(12000, 64, gap=0.4, residual_rank=0, seed=0), gain=1.5, k=2)
    fit_text, fit_image, held = pairs.split(6000, seed=0, keep_antithetic=True)
    out = {}
    for name in ("anisoalign", "anisoalign-paper"):
        fits = [fit_aligner(name, text=fit_text, image=fit_image, seed=0, device=device, rank=4) for _ in range(2)]
        same = all(np.array_equal(fits[0].tensors[k], fits[1].tensors[k]) for k in fits[0].tensors)
        z = fits[0].transform(held.text)
        out[name] = {"reproducible_on_device": bool(same), "unit_norm": bool(np.allclose(np.linalg.norm(z, axis=1), 1,
                                                                                          atol=1e-5)),
                     "stage1_steps_run": fits[0].history.get("stage1_steps_run")}
        print(name, out[name], flush=True)
    return out


def scale(device: str, n: int, dim: int, rank: int) -> list[dict]:
    pairs = make_paired_embeddings(n, dim, seed=0)
    text, image = pairs.text.astype(np.float32), pairs.image.astype(np.float32)
    rows = []
    for name, params in (("realign", {}), ("anisoalign", {"rank": rank, "preset": "cpu"}),
                         ("anisoalign", {"rank": rank, "preset": "paper"})):
        start = time.perf_counter()
        aligner = fit_aligner(name, text=text, image=image, seed=0, device=device, **params)
        row = {"name": name, "preset": params.get("preset"), "fit_s": time.perf_counter() - start,
               **{k: v[0] for k, v in aligner.history.items() if k.startswith("seconds_") or k.endswith("steps_run")}}
        if "stage1_L_I_val" in aligner.history:
            row["stage1_L_I_val_last"] = aligner.history["stage1_L_I_val"][-1]
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows[1:]:
        row["ratio_to_realign"] = row["fit_s"] / rows[0]["fit_s"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_anisoalign.json")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device; this is the GPU check (use benchmarks/bench_anisoalign.py on a CPU)",
              file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(0), "smoke": smoke("cuda"),
              "scale": scale("cuda", args.n, args.dim, args.rank)}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, default=float)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
