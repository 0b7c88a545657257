"""Fit any registered aligner on unpaired text and image embeddings and write the artifact.

    pipelines/fit.py --aligner anisoalign --texts TEXT [TEXT ...] --images IMAGE [IMAGE ...] --out DIR

TEXT / IMAGE are ``.npy`` files of (N, d) float16/float32 embeddings, folders or globs of ``.npy`` files
(read in natural order, e.g. clip-retrieval's ``img_emb/`` or the ``pipelines/embed_images.py`` /
``embed_texts.py`` output), or generated shard folders (``manifest.json``; the ``--shard-field`` of every
sample is read: ``src`` = the raw text embeddings, needs ``generate --keep-source``). Inputs are streamed
in chunks; files are read by :mod:`anisogen.embedding_files` (``EmbeddingInput``).

Before fitting every input is checked: rows must be finite and L2-normalised (``--normalize`` normalises
instead), and every file must have the same d. Errors name the file and the row. When the inputs record a
CLIP model fingerprint (a sidecar by the rule of :mod:`anisogen.embedding_files`: ``<stem>.json``, else the
folder's ``img_emb.json`` / ``text_emb.json``; or ``manifest.json``) the two sides must agree, and the artifact is
stamped with it unless ``--model-fingerprint`` is given.

After fitting it prints the diagnostics: the paired gap report (AnisoAlign §3) with ``--paired`` (row i of
the texts describes row i of the images), otherwise the unpaired parts (means, spreads, centroid gap,
spectral correlation, subspace overlap), plus the loss curves of trained stages (Stage I / Stage II) and,
for ``anisoalign``, the table of its automatic selection (every candidate's Omega_k, Psi, M_k on held-out
fit data, the ReAlign reference and the chosen row).

Example:
    pipelines/fit.py --aligner anisoalign --texts txt.npy --images img_emb/ --out runs/aligner \\
        --param rank=128 --param preset=cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from anisogen.cli import add_deprecated_alias, console_script
from anisogen.commands.defaults import ALIGNER_NAMES
from anisogen.embedding_files import EmbeddingFileError, EmbeddingInput
from anisogen.stats import Moments

GAP_COLUMNS = ["C_lambda", "O_q", "G_mu", "G_Sigma", "D_center", "R_res", "A_r", "d_eff_ratio"]


InputError = EmbeddingFileError  # bad input data (the message names the file and the row)


# ---------------------------------------------------------------------------------- reporting
def unpaired_report(text: Moments, image: Moments) -> dict:
    """The parts of the gap report that need no pairing: centroids, spreads and covariance shapes."""
    from anisogen.geometry import spectral_correlation, subspace_overlap
    from anisogen.geometry.spectrum import sorted_eigh

    d = text.dim
    q = max(1, round(d / 10))
    cov_t, cov_i = text.covariance, image.covariance
    lam_t, vec_t = sorted_eigh(cov_t)
    lam_i, vec_i = sorted_eigh(cov_i)
    return {
        "n_text": text.count, "n_image": image.count, "d": d, "q": q,
        "norm_mu_text": float(np.linalg.norm(text.mean)), "norm_mu_image": float(np.linalg.norm(image.mean)),
        "trace_text": text.trace, "trace_image": image.trace,
        "G_mu": float(np.linalg.norm(image.mean - text.mean)),
        "G_Sigma": float(np.linalg.norm(cov_i - cov_t) / (np.linalg.norm(cov_i) + 1e-12)),
        "C_lambda": spectral_correlation(cov_i, cov_t),
        "O_q": subspace_overlap(vec_i[:, :q], vec_t[:, :q]), "O_q_random": q / d,
        "top_eigen_text": [float(v) for v in lam_t[:5]], "top_eigen_image": [float(v) for v in lam_i[:5]],
    }


def curve_summary(history: dict) -> list[dict]:
    """One row per loss curve: length, first, min, last and a 10-point downsample."""
    rows = []
    for name, values in history.items():
        if name.endswith(("_step", "_steps", "_steps_run")) or name.startswith("seconds_") or not values:
            continue
        if not isinstance(values, list) or not all(isinstance(x, (int, float)) for x in values):
            continue  # tables (the AnisoAlign selection) are printed on their own
        v = np.asarray(values, dtype=np.float64)
        idx = np.unique(np.linspace(0, len(v) - 1, min(10, len(v))).round().astype(int))
        rows.append({"name": name, "points": len(v), "first": v[0], "min": v.min(), "last": v[-1],
                     "curve": " ".join(f"{x:.4g}" for x in v[idx])})
    return rows


# ---------------------------------------------------------------------------------------- CLI
def parse_value(text: str):
    """``--param`` values: JSON when it parses (numbers, true/false/null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aligner", required=True, metavar="{" + ",".join(sorted(ALIGNER_NAMES)) + "}",
                   help="registered aligner to fit")
    p.add_argument("--texts", dest="text", nargs="+",
                   help="text embeddings: .npy file(s), folder(s) of .npy, or shard folder(s) (required)")
    add_deprecated_alias(p, "--text", "--texts", dest="text", nargs="+")
    p.add_argument("--images", dest="image", nargs="+",
                   help="image embeddings: .npy file(s), folder(s) of .npy (e.g. embed_images.py output), or shard "
                        "folder(s) (required)")
    add_deprecated_alias(p, "--image", "--images", dest="image", nargs="+")
    p.add_argument(
        "--out", required=True, help="artifact directory to write (config.json, tensors.safetensors, history.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact in --out")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="aligner parameter (repeatable), VALUE parsed as JSON when possible, e.g. --param rank=128")
    p.add_argument("--params", default="{}", help="aligner parameters as one JSON object (merged under --param)")
    p.add_argument("--seed", type=int, default=0, help="fit seed (default 0)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise rows instead of refusing non-unit rows")
    p.add_argument("--paired", action="store_true",
                   help="the inputs are row-paired (text row i describes image row i): print the paired gap report")
    p.add_argument("--diagnostic-rows", type=int, default=20000,
                   help="rows used by the paired gap report (default 20000)")
    p.add_argument("--model-fingerprint", default=None,
                   help="CLIP model fingerprint stamped on the artifact (default: the one recorded with the inputs)")
    p.add_argument("--shard-field", default="src", choices=["src", "emb"],
                   help="embedding read from shard folders: src (raw text, default) or emb (substitutes)")
    p.add_argument("--device", default=None, help="torch device for trained stages (default cpu)")
    p.add_argument("--chunk-size", type=int, default=65536, help="rows per streamed chunk (default 65536)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--json", default=None, help="also write diagnostics and loss curves to this JSON file")
    return p


def resolve_fingerprint(args, text: EmbeddingInput, image: EmbeddingInput) -> str | None:
    recorded = text.fingerprints | image.fingerprints
    if len(recorded) > 1:
        raise InputError(f"the inputs were embedded with different CLIP models: {sorted(recorded)}")
    if args.model_fingerprint is not None:
        if recorded and args.model_fingerprint not in recorded:
            raise InputError(
                f"--model-fingerprint {args.model_fingerprint!r} differs from the inputs' {sorted(recorded)}"
            )
        return args.model_fingerprint
    return next(iter(recorded)) if recorded else None


def run(args) -> dict:
    params = json.loads(args.params)
    for item in args.param:
        if "=" not in item:
            raise InputError(f"--param {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        params[key] = parse_value(value)
    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise InputError(f"{out} already holds an aligner artifact; pass --overwrite to replace it")

    text = EmbeddingInput("text", args.text, shard_field=args.shard_field, chunk_size=args.chunk_size)
    image = EmbeddingInput("image", args.image, shard_field=args.shard_field, chunk_size=args.chunk_size)
    n_text, d_text = text.validate(normalize=args.normalize, dim=None, normalize_hint="pass --normalize")
    n_image, d_image = image.validate(normalize=args.normalize, dim=None, normalize_hint="pass --normalize")
    if d_text != d_image:
        raise InputError(f"dimension mismatch: text inputs ({text.parts[0][0]}) have d={d_text}, "
                         f"image inputs ({image.parts[0][0]}) have d={d_image}")
    if args.paired and n_text != n_image:
        raise InputError(f"--paired needs as many texts as images, got {n_text} texts and {n_image} images")
    fingerprint = resolve_fingerprint(args, text, image)
    print(f"inputs: {n_text} texts, {n_image} images, d = {d_text}; model fingerprint: {fingerprint}")

    from anisogen.align import ALIGNERS

    start = time.perf_counter()
    aligner = ALIGNERS[args.aligner](**params).fit(
        text, image, seed=args.seed, model_fingerprint=fingerprint, normalize=args.normalize, device=args.device,
        progress=not args.no_progress, chunk_size=args.chunk_size)
    fit_seconds = time.perf_counter() - start
    if args.overwrite and out.exists():
        (out / "config.json").unlink(missing_ok=True)  # the artifact is incomplete until save() rewrites it
    aligner.save(out)
    print(f"fitted {args.aligner} in {fit_seconds:.1f}s -> {out}")
    stages = {k[len("seconds_"):]: v[0] for k, v in aligner.history.items() if k.startswith("seconds_")}
    if stages:
        print("  stage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))

    result: dict = {"aligner": args.aligner, "params": aligner.params, "fit_seconds": fit_seconds,
                    "fit_counts": aligner.fit_counts, "artifact": str(out)}
    from anisogen.report import markdown_table

    if args.paired:
        from anisogen.geometry import gap_report

        n = min(args.diagnostic_rows, n_text)
        gap = gap_report(image=image.head(n), text=text.head(n), normalize=args.normalize)
        print(f"\nModality gap of the first {n} paired rows (AnisoAlign §3):")
        print(markdown_table([{"name": "inputs", **gap}], GAP_COLUMNS, first="name"))
        result["gap_report"] = {k: v for k, v in gap.items() if np.isscalar(v)}
    else:
        tm = Moments.from_source(text, name="text", normalize=args.normalize, chunk_size=args.chunk_size)
        im = Moments.from_source(image, name="image", normalize=args.normalize, chunk_size=args.chunk_size)
        unpaired = unpaired_report(tm, im)
        print("\nUnpaired diagnostics (pass --paired for the paired gap report):")
        cols = ["n_text", "n_image", "norm_mu_text", "norm_mu_image", "trace_text", "trace_image", "G_mu", "G_Sigma",
                "C_lambda", "O_q", "O_q_random"]
        print(markdown_table([{"name": "inputs", **unpaired}], cols, first="name"))
        result["unpaired_report"] = unpaired
    table = aligner.selection_table() if hasattr(aligner, "selection_table") else ""
    if table:
        print("\nAutomatic selection on held-out *fit* texts and images (unpaired; docs/ANISOALIGN.md):")
        print(table)
    curves = curve_summary(aligner.history)
    if curves:
        print("\nLoss curves (window means; *_val = fixed validation batch):")
        print(markdown_table(curves, ["points", "first", "min", "last", "curve"], first="name"))
    else:
        print("\nNo trained stages (closed-form aligner): no loss curves.")
    result["history"] = aligner.history
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
        print(f"\nwrote {args.json}")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    """Parse, then check what argparse cannot see without the registry: the aligner name, both inputs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--texts", args.text), ("--images", args.image)) if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from anisogen.align import ALIGNERS

    if args.aligner not in ALIGNERS:
        names = ", ".join(repr(n) for n in sorted(ALIGNERS))
        parser.error(f"argument --aligner: invalid choice: {args.aligner!r} (choose from {names})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


entry = console_script(main)
