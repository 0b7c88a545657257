"""Train the bundled toy CLIP on toy-world scenes (CPU) and write its weights as float16 safetensors.

Example (the committed weights; see docs/TOYCLIP.md for the exact command, time and metrics):
    python pipelines/train_toyclip.py --out anisogen/assets/toyclip.safetensors --log runs/toyclip.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from anisogen.cli import console_script
from anisogen.toyworld.clip_config import TrainConfig

HELP = {
    "model": "open_clip architecture to train (a config registered by anisogen)",
    "n_scenes": "number of train-split scenes rendered once and cycled through",
    "caption_seeds": "caption seeds per scene (each gives the 7 caption styles)",
    "steps": "optimisation steps",
    "batch_size": "scenes per step (distinct within a step)",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "final learning rate of the cosine schedule",
    "weight_decay": "AdamW weight decay on weight matrices",
    "warmup": "linear warmup steps",
    "seed": "seed of the init, data sampling and evaluation set",
    "eval_every": "evaluate on held-out scenes (and checkpoint) every N steps",
    "eval_pairs": "held-out pairs for the gap metrics during training and at the end",
    "threads": "torch CPU threads",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"{HELP[f.name]} (default: %(default)s)")
    p.add_argument("--out", default="anisogen/assets/toyclip.safetensors",
                   help="output weights (float16 safetensors; written at each evaluation and at the end)")
    p.add_argument("--cache-dir", default=None,
                   help="directory for the rendered/tokenised training set cache (default: no cache)")
    p.add_argument("--log", default=None, help="JSONL log of losses and held-out metrics (default: none)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    p.add_argument("--eval-only", action="store_true",
                   help="do not train: evaluate the weights at --out on fresh held-out scenes (--eval-seed) and exit")
    p.add_argument("--eval-seed", type=int, default=1,
                   help="held-out sampling seed for --eval-only (training monitors seed --seed) (default: %(default)s)")
    p.add_argument("--eval-zero-shot", type=int, default=1000,
                   help="one-object held-out scenes for zero-shot accuracy with --eval-only (default: %(default)s)")
    p.add_argument("--eval-pairs-final", type=int, default=5000,
                   help="held-out pairs for gap metrics with --eval-only; R@1 uses the first 1000 (default: "
                        "%(default)s)")
    args = p.parse_args(argv)
    if args.eval_only:
        import time

        import torch

        from anisogen.encode import load_clip
        from anisogen.toyworld.quality import build_eval_set, evaluate_clip

        torch.set_num_threads(args.threads)
        t0 = time.time()
        model, _, tokenizer = load_clip(args.model, pretrained=args.out)
        data = build_eval_set(seed=args.eval_seed, n_zero_shot=args.eval_zero_shot, n_pairs=args.eval_pairs_final,
                              n_retrieval=min(1000, args.eval_pairs_final))
        metrics = evaluate_clip(model, tokenizer, data)
        metrics.update(
            fingerprint=model.anisogen_fingerprint, eval_seed=args.eval_seed, eval_seconds=round(time.time() - t0, 1)
        )
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return 0
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    log_file = open(args.log, "a", encoding="utf-8") if args.log else None

    def log(rec: dict) -> None:
        if log_file:
            log_file.write(json.dumps(rec, sort_keys=True) + "\n")
            log_file.flush()
        if "eval" in rec or "final" in rec:
            print(json.dumps(rec, sort_keys=True), flush=True)

    if log_file:
        log({"command": " ".join(sys.argv), "config": vars(args)})
    from anisogen.toyworld.clip_training import train_toyclip

    _, metrics = train_toyclip(cfg, args.out, cache_dir=args.cache_dir, log=log, progress=not args.no_progress)
    print(f"wrote {args.out}")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


entry = console_script(main)
