"""The gap study on the toy world: fit every registered aligner on unpaired train-split embeddings of a
CLIP (default: the bundled toy CLIP), evaluate on paired held-out scenes, and write docs/GAP_STUDY.md
with the paper's §3 gap table, the §5 method table for every aligner, and the paper's numbers beside.

Example (the committed docs/GAP_STUDY.md):
    python pipelines/gap_study.py --out docs/GAP_STUDY.md --json runs/gap_study.json
    python pipelines/gap_study.py --from-json runs/gap_study.json --out docs/GAP_STUDY.md   # re-render only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from anisogen.cli import UserError, add_deprecated_alias, console_script
from anisogen.commands.defaults import ALIGNER_NAMES


def parse_set(values: list[str]) -> dict[str, dict]:
    """``["anisoalign.stage1_steps=500", ...]`` -> ``{"anisoalign": {"stage1_steps": 500}}`` (JSON values)."""
    params: dict[str, dict] = {}
    for item in values:
        try:
            key, raw = item.split("=", 1)
            name, param = key.rsplit(".", 1)
        except ValueError:
            raise UserError(f"--set expects ALIGNER.PARAM=VALUE, got {item!r}") from None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params.setdefault(name, {})[param] = value
    return params


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def study_command(parser: argparse.ArgumentParser, result: dict, model: str, pretrained, threads: int, out: str) -> str:
    """The command that reproduces ``result``: the options that change the numbers (as recorded in the
    result, shown where they differ from the defaults) plus ``--out``; --json/--progress do not matter."""
    s = result["settings"]
    d = {a.dest: a.default for a in parser._actions}
    parts = ["python", "pipelines/gap_study.py"]
    if model != d["model"]:
        parts += ["--model", model]
    if pretrained is not None:
        parts += ["--pretrained", str(pretrained)]
    for key in ("n_text", "n_images", "n_pairs", "n_retrieval", "k", "seed"):
        if s[key] != d[key]:
            parts += ["--" + key.replace("_", "-"), str(s[key])]
    from anisogen.align import ALIGNERS

    names = s.get("aligners", list(result["methods"]))
    if names != list(ALIGNERS):
        parts += ["--aligners", ",".join(names)]
    for name, kv in (s.get("overrides") or {}).items():
        for key, value in kv.items():
            parts += ["--param", f"{name}.{key}={json.dumps(value)}"]
    if s.get("diagnostics") is False:
        parts.append("--no-diagnostics")
    if threads != d["threads"]:
        parts += ["--threads", str(threads)]
    parts += ["--out", out]
    return " ".join(shlex.quote(x) for x in parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="open_clip model name (default: %(default)s)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag or local checkpoint path (default: the bundled weights for toy)")
    p.add_argument("--n-text", type=int, default=20_000, help="unpaired train-split captions (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=10_000, help="unpaired train-split images (default: %(default)s)")
    p.add_argument("--n-pairs", type=int, default=5000, help="paired held-out scenes (default: %(default)s)")
    p.add_argument("--n-retrieval", type=int, default=1000,
                   help="held-out pairs used for substitute<->image R@1 (default: %(default)s)")
    p.add_argument("--k", type=int, default=20, help="neighbourhood size of Omega_k and M_k (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, aligners and metrics (default: %(default)s)")
    p.add_argument("--aligners", default=None,
                   help=f"comma-separated aligner names (default: every registered one; now {','.join(ALIGNER_NAMES)})")
    add_deprecated_alias(p, "--set", "--param", dest="set")
    p.add_argument("--param", dest="set", action="append", default=[], metavar="ALIGNER.PARAM=VALUE",
                   help="aligner hyper-parameter override, VALUE parsed as JSON; repeatable")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--out", default="docs/GAP_STUDY.md", help="markdown report (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    add_deprecated_alias(p, "--progress", "--no-progress (progress is the default now)", dest="progress", const=True)
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip the diagnostic fits (DIAGNOSTICS in anisogen/toyworld/gap_study.py) of the report")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="do not compute: re-render --out from a results JSON written earlier with --json (its "
                        "recorded settings, command and runtime are kept; the study options are ignored)")
    args = p.parse_args(argv)
    out = Path(args.out)
    from anisogen.toyworld.gap_study import render_markdown

    if args.from_json:
        from anisogen.align import ALIGNERS
        from anisogen.toyworld.gap_study import DIAGNOSTICS

        try:
            saved = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
            result = {k: saved[k] for k in ("settings", "gap", "methods", "timings")}
            diag = saved.get("diagnostics") or {}
            result["diagnostics"] = {k: diag[k] for k in [*DIAGNOSTICS, *sorted(diag)] if k in diag}
            # the JSON has sorted keys: restore the run's aligner order (registry order for older files)
            order = result["settings"].get("aligners") or [n for n in ALIGNERS if n in result["methods"]]
            order += [n for n in result["methods"] if n not in order]
            result["methods"] = {n: result["methods"][n] for n in order}
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            print(f"error: {args.from_json}: not a gap-study results JSON ({exc!r})", file=sys.stderr)
            return 2
        command = saved.get("command") or study_command(p, result, args.model, args.pretrained, args.threads, args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(result, command=command), encoding="utf-8")
        print(f"wrote {out} from {args.from_json}")
        return 0
    import torch

    from anisogen.encode import load_clip
    from anisogen.toyworld.gap_study import run_gap_study

    torch.set_num_threads(args.threads)
    model, preprocess, tokenizer = load_clip(args.model, args.pretrained)
    names = None if args.aligners is None else [n.strip() for n in args.aligners.split(",") if n.strip()]
    try:
        result = run_gap_study(model, tokenizer, fingerprint=model.anisogen_fingerprint, n_text=args.n_text,
                               n_images=args.n_images, n_pairs=args.n_pairs, n_retrieval=args.n_retrieval, k=args.k,
                               seed=args.seed, aligners=names, params=parse_set(args.set), preprocess=preprocess,
                               diagnostics=not args.no_diagnostics,
                               progress=args.progress, log=lambda m: print(m, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = study_command(p, result, args.model, args.pretrained, args.threads, args.out)
    if args.json:  # first, so that the results survive a failure while rendering
        Path(args.json).write_text(json.dumps(_jsonable(dict(result, command=command)), indent=1, sort_keys=True),
                                   encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(result, command=command), encoding="utf-8")
    print(f"wrote {out} ({result['timings']['total_s']} s)")
    return 0


entry = console_script(main)
