"""Compare aligners on one dataset: fit each on unpaired text/image, score on held-out pairs.

Data comes from ``.npy`` files (``--texts``, ``--images``, ``--heldout-texts``, ``--heldout-images``)
or, with ``--synthetic``, from :func:`anisogen.synthetic.make_paired_embeddings` (planted gap).
Prints the §3 gap diagnostics of the held-out pairs and the §5 method table.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from anisogen.cli import UserError, add_deprecated_alias, console_script
from anisogen.commands.defaults import ALIGNER_NAMES

GAP_COLUMNS = ["C_lambda", "O_q", "G_mu", "G_Sigma", "D_center", "R_res", "A_r", "d_eff_ratio"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data")
    src.add_argument("--synthetic", action="store_true", help="use synthetic planted-gap embeddings")
    src.add_argument("--n", type=int, default=8000, help="synthetic: number of items (default 8000)")
    src.add_argument("--dim", type=int, default=64, help="synthetic: embedding dimension (default 64)")
    src.add_argument("--gap", type=float, default=0.4, help="synthetic: planted centroid gap (default 0.4)")
    src.add_argument("--residual-rank", type=int, default=0,
                     help="synthetic: rank of an image-only residual no text->image map can remove (default 0)")
    src.add_argument("--gain", type=float, default=1.5,
                     help="synthetic: anisotropic gain on the images' top content directions (default 1.5)")
    src.add_argument("--gain-rank", type=int, default=2,
                     help="synthetic: number of content directions carrying --gain (default 2; 0 = none)")
    src.add_argument("--texts", dest="fit_text", help=".npy (N, d) unpaired text embeddings to fit on")
    src.add_argument("--images", dest="fit_image", help=".npy (N, d) unpaired image embeddings to fit on")
    src.add_argument("--heldout-texts", dest="heldout_text",
                     help=".npy (M, d) held-out text embeddings, row-paired with --heldout-images")
    src.add_argument("--heldout-images", dest="heldout_image", help=".npy (M, d) held-out image embeddings")
    for old, new, dest in (("--fit-text", "--texts", "fit_text"), ("--fit-image", "--images", "fit_image"),
                           ("--heldout-text", "--heldout-texts", "heldout_text"),
                           ("--heldout-image", "--heldout-images", "heldout_image")):
        add_deprecated_alias(src, old, new, dest=dest)
    p.add_argument("--aligners", nargs="+", default=None,
                   help=f"aligners to compare (default: all registered: {', '.join(ALIGNER_NAMES)})")
    p.add_argument("--params", default="{}",
                   help='JSON dict of per-aligner params, e.g. \'{"c3": {"calibrate_phi": 0.9}}\'; a key '
                        '"anisoalign*" applies to every AnisoAlign variant')
    p.add_argument("--seed", type=int, default=0, help="seed for fitting and metrics (default 0)")
    p.add_argument("--k", type=int, default=20, help="neighbourhood size for Omega_k and M_k (default 20)")
    p.add_argument("--json", help="also write all rows as JSON to this path")
    return p.parse_args(argv)


def load_data(args):
    from anisogen.embedding_files import EmbeddingFileError, open_embeddings
    from anisogen.synthetic import make_paired_embeddings

    if args.synthetic:
        pairs = make_paired_embeddings(args.n, args.dim, gap=args.gap, residual_rank=args.residual_rank,
                                       gain=args.gain, gain_rank=args.gain_rank, seed=args.seed)
        fit_text, fit_image, held = pairs.split(args.n // 2, seed=args.seed)
        return fit_text, fit_image, held.image, held.text
    paths = [args.fit_text, args.fit_image, args.heldout_text, args.heldout_image]
    if not all(paths):
        raise UserError("give --synthetic or all of --texts --images --heldout-texts --heldout-images")
    try:  # files, folders or globs of .npy, checked (2-D, same d, finite) by anisogen.embedding_files
        fit_text, fit_image, held_text, held_image = [open_embeddings(p).load(dtype=np.float64) for p in paths]
    except EmbeddingFileError as exc:
        raise UserError(f"{exc}")
    return fit_text, fit_image, held_image, held_text


def expand_params(params: dict) -> dict:
    """Expand a trailing-``*`` key (e.g. ``"anisoalign*"``) to every registered aligner it matches."""
    from anisogen.align import ALIGNERS

    out = {}
    for key, value in params.items():
        names = [n for n in ALIGNERS if n.startswith(key[:-1])] if key.endswith("*") else [key]
        for name in names:
            out[name] = {**out.get(name, {}), **value}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    fit_text, fit_image, held_image, held_text = load_data(args)
    from anisogen.align.compare import METHOD_COLUMNS, compare_aligners
    from anisogen.geometry import gap_report
    from anisogen.report import markdown_table

    print(f"fit: {len(fit_text)} texts, {len(fit_image)} images (unpaired); held-out pairs: {len(held_text)}; "
          f"d = {held_text.shape[1]}\n")
    gap = gap_report(image=held_image, text=held_text)
    print("Modality gap of the held-out pairs (AnisoAlign §3):")
    print(markdown_table([{"name": "held-out", **gap}], GAP_COLUMNS, first="name"), "\n")
    rows = compare_aligners(fit_text=fit_text, fit_image=fit_image, heldout_image=held_image,
                            heldout_text=held_text, names=args.aligners, params=expand_params(json.loads(args.params)),
                            seed=args.seed, k=args.k)
    print(f"Aligners on held-out pairs (AnisoAlign §5, k = {args.k}):")
    print(markdown_table(rows, [*METHOD_COLUMNS, "fit_seconds"], first="name"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gap": {k: v for k, v in gap.items() if np.isscalar(v)}, "aligners": rows}, fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


entry = console_script(main)
