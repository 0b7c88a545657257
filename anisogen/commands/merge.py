"""APP: merge a fine-tuned projector into its pre-trained anchor by spectral filtering of the task vector.

    python pipelines/merge.py --pre runs/stage1/export --ft runs/stage2/export --out merged/ --app energy:0.8

--pre / --ft are projector .safetensors files or folders holding projector.safetensors (exports,
checkpoints). --out is a .safetensors path or a folder (receives projector.safetensors and
app_report.json). With --export-from, --out becomes a complete export: a copy of that export folder
with its projector replaced by the merged one (loadable with anisogen.train.load_export). An export
holding parts trained next to its projector (a LoRA/Gap-Init adapter, MoReS steering, full LM weights)
is refused: those parts co-adapted to the unfiltered projector. Use the export of a projector-only run,
or pass --allow-coadapted.
See docs/METHODS.md (APP) for the math and every default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from anisogen.cli import console_script
from anisogen.train.config import APP_SPEC_HELP, BIAS_POLICIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pre", required=True, help="theta_pre: stage-1 projector (.safetensors or folder)")
    p.add_argument("--ft", required=True, help="theta_ft: fine-tuned projector (.safetensors or folder)")
    p.add_argument("--out", required=True, help="merged output: .safetensors path or folder")
    p.add_argument("--app", default="energy:0.8", metavar="SPEC", help=f"merge rule: {APP_SPEC_HELP}")
    p.add_argument(
        "--alpha", type=float, default=1.0, help="task-vector scale alpha in theta_pre + alpha*tau_k (paper: 1.0)"
    )
    p.add_argument("--bias", dest="bias_policy", choices=BIAS_POLICIES, default="full",
                   help="1-D tensors: full (pre + alpha*delta), drop (pre), scale (pre + alpha*rho*delta, rho = kept "
                        "norm fraction of the sibling weight)")
    p.add_argument("--bias-scale", type=float, default=None, help="constant rho for --bias scale")
    p.add_argument("--layers", default=None, metavar="REGEX",
                   help="filter only matrices whose name matches REGEX (e.g. '^2\\.' = the layer next to the LM); "
                        "others get the full delta. Default: every matrix")
    p.add_argument("--min-k", type=int, default=1, help="lower bound on the kept components k")
    p.add_argument("--prefix", default=None, help="only tensors whose name starts with PREFIX (stripped for the merge)")
    p.add_argument("--report", default=None, help="JSON report path (default: next to the output)")
    p.add_argument("--export-from", default=None, metavar="EXPORT_DIR",
                   help="copy this export folder to --out and put the merged projector in it")
    p.add_argument("--allow-coadapted", action="store_true",
                   help="accept an --export-from export whose adapter / steering / LM weights trained next to its "
                        "(unfiltered) projector; by default such an export is refused")
    p.add_argument("--spectrum", default=None, metavar="DIR", help="also write spectrum.json/png (analysis) to DIR")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from anisogen.train.methods.app import coadapted_parts, merge_files, parse_app_spec, summarize

    cfg = parse_app_spec(a.app, alpha=a.alpha, bias_policy=a.bias_policy, bias_scale=a.bias_scale,
                         include=a.layers, min_k=a.min_k)
    out = Path(a.out)
    if a.export_from:
        src = Path(a.export_from)
        if not (src / "config.json").is_file():
            print(f"error: {src} is not an export folder (no config.json)", file=sys.stderr)
            return 2
        if out.suffix == ".safetensors":
            print("error: with --export-from, --out must be a folder", file=sys.stderr)
            return 2
        parts = coadapted_parts(src)
        if parts and not a.allow_coadapted:
            print(f"error: {src} holds {', '.join(parts)}, trained next to its projector; they co-adapted to the "
                  "unfiltered projector, so pairing them with the merged one gives a model that was never trained. "
                  "Use the export of a projector-only run (--method projector), or pass --allow-coadapted",
                  file=sys.stderr)
            return 2
        tmp = out.with_name(f".tmp-{out.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        report = merge_files(a.pre, a.ft, tmp, cfg, prefix=a.prefix, report_path=a.report)
        report["overrides"] = {"allow_coadapted": bool(parts), "coadapted_parts": parts}
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        report["output"] = str(out / "projector.safetensors")
        Path(a.report or out / "app_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    else:
        report = merge_files(a.pre, a.ft, out, cfg, prefix=a.prefix, report_path=a.report)
    for line in summarize(report):
        print(line)
    if a.spectrum:
        from anisogen.train.methods.app import load_state, projector_spectrum

        pre, _ = load_state(a.pre, a.prefix)
        ft, _ = load_state(a.ft, a.prefix)
        projector_spectrum(pre, ft, a.spectrum, cfg)
        print(f"spectrum: {Path(a.spectrum) / 'spectrum.png'}")
    print(f"merged projector: {report['output']}  (totals: {json.dumps(report['totals'])})")
    return 0


entry = console_script(main)
