"""Command-line front end of the generator (``pipelines/generate.py`` and ``anisogen-generate``, through
:mod:`anisogen.commands.generate`, are thin wrappers over :func:`main`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from ..cli import add_deprecated_alias
from .config import GenerateConfig


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already names its default or the
    default is empty (None/False/[]): ``--help`` stays readable without stale duplicates."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or default == []
                or not action.option_strings):
            return text
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Turn a text corpus into WebDataset shards of substitute image embeddings: "
                    "corpus -> CLIP text tower (trimmed, bucketed) -> aligner -> shard-XXXXXX.tar. "
                    "Resumable and exactly-once: rerun the same command after a crash. "
                    "Multi-GPU / multi-node: prefix with `accelerate launch`. See docs/GENERATE.md.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("input corpus")
    g.add_argument("--corpus", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="local .jsonl/.json/.csv/.parquet/.txt files, globs or folders (read in sorted order), "
                        "or a hub dataset name (owner/name, streamed)")
    g.add_argument(
        "--text-field", default="text", help="key/column holding the text (ignored for .txt: one text per line)"
    )
    g.add_argument("--id-field", default=None, help="key/column holding a source id (default: the input row number)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N input rows (rejected rows count)")
    g.add_argument("--streaming", action="store_true", default=None,
                   help="read the corpus as a stream instead of building an Arrow cache (default for hub names)")
    g.add_argument("--split", default="train", help="hub dataset split")
    g.add_argument("--hub-config", default=None, help="hub dataset configuration name")
    g.add_argument("--dedup", action="store_true", help="reject exact duplicate texts (first occurrence kept)")
    g.add_argument("--cache-dir", default=None, help="HF datasets cache folder for the Arrow files")

    g = p.add_argument_group("CLIP model")
    g.add_argument("--model", default="toy", help="open_clip model name (e.g. ViT-B-32) or the bundled 'toy'")
    g.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag, a local checkpoint path, or 'random' (default: bundled weights "
                        "for toy, random init for other names)")

    g = p.add_argument_group("aligner (fit with --aligner + --images, or reuse with --aligner-dir)")
    g.add_argument(
        "--aligner",
        default=None,
        help="aligner to fit: identity, centroid, unicorn, c3, realign, anisoalign (and its ablations anisoalign-*)",
    )
    g.add_argument("--param", dest="aligner_param", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="aligner hyper-parameter (JSON value), repeatable, e.g. --param sigma=0.5")
    add_deprecated_alias(g, "--aligner-param", "--param", dest="aligner_param", type=_kv)
    g.add_argument("--images", default=None,
                   help="unpaired images to fit on: an image folder, WebDataset image tars, or precomputed .npy "
                        "embeddings (clip-retrieval img_emb/ or the output of pipelines/embed_images.py)")
    g.add_argument("--aligner-dir", default=None,
                   help="reuse a fitted aligner artifact (its model fingerprint must match --model/--pretrained)")
    g.add_argument("--fit-samples", type=int, default=50_000, help="size of the seeded random corpus sample to fit on")
    g.add_argument("--fit-images", type=int, default=None, help="use at most N images for fitting (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the fit sample and of the aligner")
    g.add_argument("--fit-only", action="store_true",
                   help="stop after fitting the aligner (e.g. before a Slurm job array)")

    g = p.add_argument_group("output shards")
    g.add_argument(
        "--out", required=True, help="output folder (shards, manifest.json, sizes.json, rejects.jsonl, aligner/)"
    )
    g.add_argument("--samples-per-shard", type=int, default=10_000, help="input rows per task/shard")
    g.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="storage dtype of emb.npy/src.npy: float16, bfloat16 bits in a uint16 array, or float32")
    g.add_argument("--keep-source", action="store_true", help="also store the raw text embedding as src.npy")
    g.add_argument("--overwrite", action="store_true",
                   help="discard previous outputs in --out (required to change the config of an existing run)")
    g.add_argument("--verify", default="sha256", choices=["sha256", "size", "none"],
                   help="how a resume checks already published shards against their records")

    g = p.add_argument_group("encoding")
    g.add_argument("--batch-size", type=int, default=256, help="texts per forward pass")
    g.add_argument("--bucket-window", type=int, default=None,
                   help="sort-by-length window in texts (default: the whole task)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--pad-multiple", type=int, default=None,
                   help="round trimmed batch lengths up to a multiple (default 8 on GPU, 1 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the text tower forward")
    g.add_argument("--device", default="auto",
                   help="auto (the accelerate process's device: its GPU when there is one, else cpu), "
                        "or force cpu / cuda")

    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1,
                   help="DataLoader workers per process that read, validate and tokenise tasks")
    g.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: cores / local processes)"
    )
    g.add_argument("--executor", default="accelerate", choices=["accelerate", "ray"],
                   help="accelerate: this process or `accelerate launch` ranks; ray: one Ray task per shard")
    g.add_argument(
        "--ray-address", default=None, help="Ray cluster address ('auto' joins a running cluster; default: local)"
    )
    g.add_argument("--ray-retries", type=int, default=3, help="retries of a failed Ray shard task")
    g.add_argument("--ray-gpus-per-task", type=float, default=None, help="GPUs reserved per Ray task")
    g.add_argument("--job-index", dest="worker_index", type=int, default=0,
                   help="index of this job among --num-jobs independent jobs (e.g. $SLURM_ARRAY_TASK_ID)")
    g.add_argument("--num-jobs", dest="num_workers", type=int, default=1,
                   help="number of independent jobs sharing the tasks, e.g. a Slurm array")
    add_deprecated_alias(g, "--worker-index", "--job-index", dest="worker_index", type=int)
    add_deprecated_alias(g, "--num-workers", "--num-jobs", dest="num_workers", type=int)
    g.add_argument(
        "--manifest-interval", type=float, default=30.0, help="seconds between manifest refreshes while running"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar or summary (logs only)")
    g.add_argument("--summary-json", default=None, help="also write the final summary to this JSON file")
    g.add_argument("--allow-empty", action="store_true",
                   help="exit 0 even when no sample was written (an empty corpus, or every row rejected)")
    g.add_argument("--log-level", default="WARNING", help="python logging level")
    return p


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    return GenerateConfig(
        corpus=list(args.corpus), out=args.out, text_field=args.text_field, id_field=args.id_field, limit=args.limit,
        streaming=args.streaming, split=args.split, hub_config=args.hub_config, dedup=args.dedup, model=args.model,
        pretrained=args.pretrained, aligner=args.aligner, aligner_params=dict(args.aligner_param),
        aligner_dir=args.aligner_dir, images=args.images, fit_samples=args.fit_samples, fit_images=args.fit_images,
        seed=args.seed, samples_per_shard=args.samples_per_shard, dtype=args.dtype, keep_source=args.keep_source,
        batch_size=args.batch_size, bucket_window=args.bucket_window, precision=args.precision,
        pad_multiple=args.pad_multiple,
        device=None if args.device == "auto" else args.device, compile=args.compile, workers=args.workers,
        threads=args.threads, executor=args.executor, ray_address=args.ray_address, ray_retries=args.ray_retries,
        ray_gpus_per_task=args.ray_gpus_per_task, worker_index=args.worker_index, num_workers=args.num_workers,
        overwrite=args.overwrite, verify=args.verify, fit_only=args.fit_only, cache_dir=args.cache_dir,
        progress=not args.no_progress, manifest_interval_s=args.manifest_interval, allow_empty=args.allow_empty,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .config import GenerateInputError
    from .run import ConfigMismatch, generate
    from ..encode.corpus import CorpusError

    try:
        cfg = config_from_args(args).validate()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        summary = generate(cfg)
    except (ConfigMismatch, CorpusError, GenerateInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.summary_json and summary:
        from ..shards.writer import atomic_write_json

        atomic_write_json(args.summary_json, summary)
    return _empty_result_status(summary, cfg)


def _empty_result_status(summary: dict, cfg: GenerateConfig) -> int:
    """1 with a one-line reason when a finished run wrote no sample at all (unless ``--allow-empty``)."""
    if not summary or summary.get("status") != "complete" or summary.get("samples") or cfg.allow_empty:
        return 0
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("reject_reasons", {}).items())) or "none"
    print(f"error: no sample was written ({cfg.out}): {summary.get('rejects', 0)} input row(s), all rejected "
          f"(reasons: {reasons}); see {cfg.out}/rejects.jsonl, or pass --allow-empty if an empty result is "
          "expected", file=sys.stderr)
    return 1
