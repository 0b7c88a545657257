#!/usr/bin/env python
"""`make demo`: the main job on the embedded default, step by step.

Current steps:
1. Fit every registered aligner on unpaired synthetic embeddings with a planted modality gap, and
   print the gap diagnostics and the method table on held-out pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_aligners  # noqa: E402  (sibling pipeline script)


def main() -> int:
    print("== step 1/1: aligners on synthetic planted-gap embeddings ==")
    fast_aniso = {"rank": 4, "stage1_steps": 600, "stage1_lr": 3e-3, "batch_size": 256}
    params = json.dumps({"c3": {"calibrate_phi": 0.9}, "anisoalign*": fast_aniso})
    return compare_aligners.main(["--synthetic", "--n", "8000", "--dim", "64", "--params", params])


if __name__ == "__main__":
    raise SystemExit(main())
