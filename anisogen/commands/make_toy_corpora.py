"""Write the toy-world corpora into a folder: a text-only caption corpus (JSONL {"id", "text"}), an
unpaired image set (PNG), and held-out paired evaluation data (images + captions + instructions).

Layout and determinism: see anisogen/toyworld/corpora.py. Example (the demo's default):
    python pipelines/make_toy_corpora.py --out data/toyworld
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from anisogen.cli import console_script
from anisogen.toyworld.corpora import write_corpora


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (built under a temporary name, then renamed)")
    p.add_argument("--n-text", type=int, default=100_000,
                   help="lines of the text-only caption corpus, one train-split scene each (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=10_000,
                   help="unpaired train-split images, scenes independent of the captions (default: %(default)s)")
    p.add_argument("--n-heldout", type=int, default=1000,
                   help="held-out paired scenes (images, 7 captions, instructions) (default: %(default)s)")
    p.add_argument("--n-novel", type=int, default=0,
                   help="paired scenes with held-out colour-shape combinations, 0 = none (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampled scene and caption (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="rendered image side in pixels (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        manifest = write_corpora(args.out, n_text=args.n_text, n_images=args.n_images, n_heldout=args.n_heldout,
                                 n_novel=args.n_novel, seed=args.seed, image_size=args.image_size,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"], sort_keys=True))
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")
    return 0


entry = console_script(main)
