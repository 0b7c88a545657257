"""Analyses behind APP, Gap-Init and MoReS (see docs/METHODS.md).

  spectrum       singular values + cumulative energy of the projector task vector (APP appendix A)
                 python pipelines/analyze.py spectrum --pre runs/s1/export --ft runs/s2/export --out-dir an/
  lmar           layer-wise modality attention ratio during generation (MoReS eq. 2), one line per export
                 python pipelines/analyze.py lmar --export lora=runs/lora/export --export mores=runs/mores/export \\
                     --shards shards/val --out-dir an/
  gap-alignment  Gap-Init vs random-direction vs PEFT-default LoRA on a projector-only export: cos(B[:,0], g)
                 at init and the gradient norm along the gap over the first steps
                 python pipelines/analyze.py gap-alignment --export runs/s1/export --shards shards/val --out-dir an/

Embedding/text pairs come from a shard folder (--shards) or from --images X.npy (N, d) image embeddings with
--captions captions.txt (one line per row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anisogen.cli import add_deprecated_alias, console_script


def _add_pairs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default=None, help="shard folder with emb.npy + txt samples")
    p.add_argument("--images", default=None, help="(N, d) .npy of image embeddings (instead of --shards)")
    add_deprecated_alias(p, "--embeddings", "--images", dest="images")
    p.add_argument("--captions", default=None, help="captions, one line per --images row")
    add_deprecated_alias(p, "--texts", "--captions", dest="captions")
    p.add_argument("--limit", type=int, default=64, help="use at most this many pairs")
    p.add_argument("--batch-size", type=int, default=8, help="batch size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("spectrum", help="projector task-vector spectrum (PNG + JSON)")
    s.add_argument(
        "--pre", required=True, help="theta_pre projector (.safetensors or folder with projector.safetensors)"
    )
    s.add_argument("--ft", required=True, help="theta_ft projector (.safetensors or folder)")
    s.add_argument("--app", default="energy:0.8", help="k rule marked on the plot (energy:F | ratio:R)")
    s.add_argument("--out-dir", required=True, help="writes spectrum.json and spectrum.png here")

    lm = sub.add_parser("lmar", help="LMAR per layer during greedy generation (JSON + PNG, one line per export)")
    lm.add_argument("--export", action="append", required=True, metavar="[NAME=]DIR",
                    help="export folder (repeatable); NAME labels its line (default: the method name)")
    _add_pairs(lm)
    lm.add_argument(
        "--prompt", default=None, help="user instruction after <image> (default: the export's training prompt)"
    )
    lm.add_argument("--max-new-tokens", type=int, default=16, help="generated tokens per sample")
    lm.add_argument("--reduce", choices=["mean", "sum"], default="mean",
                    help="alpha per modality: mean attention weight per token (eq. 2 default) or total mass")
    lm.add_argument("--text-keys", choices=["prompt", "prompt+generated"], default="prompt",
                    help="text tokens attended to: the prompt's (eq. 2) or also those generated so far "
                         "(needed for plain-template exports, whose prompt has no text)")
    lm.add_argument("--out-dir", required=True, help="writes lmar.json and lmar.png here")

    g = sub.add_parser("gap-alignment", help="Gap-Init alignment and early gradient norms along the gap")
    g.add_argument("--export", required=True, help="projector-only export (e.g. stage 1) whose LM gets the adapters")
    _add_pairs(g)
    g.add_argument("--calib-samples", type=int, default=256, help="calibration pairs for the gap (paper: 256)")
    g.add_argument("--num-layers", type=int, default=6, help="adapt the last N decoder layers (paper: 6)")
    g.add_argument("--targets", default=None, help="comma-separated LoRA targets (default: q,k,v,o,gate,up,down_proj)")
    g.add_argument("--r", type=int, default=1, help="LoRA rank (paper: 1)")
    g.add_argument("--alpha", type=float, default=2.0, help="LoRA alpha (paper: 2)")
    g.add_argument("--steps", type=int, default=5, help="optimisation steps traced")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (paper: 2e-4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random direction / LoRA init")
    g.add_argument("--prefix-ids", default=None, metavar="IDS",
                   help="comma-separated token ids put before each calibration sequence, i.e. what the export's "
                        "template puts before <image> (default: BOS; required for tokenizers without BOS)")
    g.add_argument("--out-dir", required=True, help="writes gap_alignment.json and gap_alignment.png here")
    return p


def _pairs(a):
    from anisogen.train.methods.analysis_common import load_pairs

    return load_pairs(shards=a.shards, embeddings=a.images, texts=a.captions, limit=a.limit)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(min(4, torch.get_num_threads()))
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.cmd == "spectrum":
        from anisogen.train.methods.app import load_state, parse_app_spec, projector_spectrum

        res = projector_spectrum(load_state(a.pre)[0], load_state(a.ft)[0], out, parse_app_spec(a.app))
        for n, r in res.items():
            print(f"{n}: rank {r['rank']}, k={r['k']} keeps {r['retained_energy']:.4f} of the energy")
        print(f"wrote {out / 'spectrum.png'}")
        return 0

    from anisogen.train.export import load_export

    embs, texts = _pairs(a)
    if a.cmd == "lmar":
        from anisogen.train.methods.mores import lmar_for_export, write_lmar_report

        results = {}
        for item in a.export:
            name, sep, path = item.partition("=")
            if not sep:
                name, path = "", item
            exp = load_export(path)
            label = name or exp.config.get("method", Path(path).name)
            if label in results:
                label = f"{label}:{Path(path).parent.name}"
            results[label] = lmar_for_export(exp, embs, texts, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                                             batch_size=a.batch_size, reduce=a.reduce, text_keys=a.text_keys)
            results[label]["export"] = str(path)
            print(f"{label}: LMAR per layer {[round(x, 4) for x in results[label]['lmar']]}")
        files = write_lmar_report(results, out)
        print(f"wrote {files['json']} and {files['png']}")
        return 0

    from anisogen.train.methods.analysis_common import plot_lines
    from anisogen.train.methods.gap_init import gap_alignment_for_export

    targets = [t.strip() for t in a.targets.split(",")] if a.targets else None
    res = gap_alignment_for_export(lambda: load_export(a.export), embs, texts, calib_samples=a.calib_samples,
                                   num_layers=a.num_layers, targets=targets, r=a.r, alpha=a.alpha, steps=a.steps,
                                   lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                                   prefix_ids=[int(x) for x in a.prefix_ids.split(",")] if a.prefix_ids else ())
    (out / "gap_alignment.json").write_text(json.dumps(res, indent=2))
    plot_lines({f"{v}: ||g^T dL/dW||": [t["gap_grad"] for t in r["trace"]] for v, r in res["variants"].items()}
               | {f"{v}: ||dL/dA||": [t["grad_A"] for t in r["trace"]] for v, r in res["variants"].items()},
               out / "gap_alignment.png", title="Gradient norms over the first steps", xlabel="step",
               ylabel="norm", logy=True)
    for v, r in res["variants"].items():
        print(f"{v}: init cos(B[:,0], g) mean {r['init_cos_mean']:.4f}; grad along gap at step 0 "
              f"{r['trace'][0]['gap_grad']:.4g}, ||dL/dA|| {r['trace'][0]['grad_A']:.4g}")
    print(
        f"random-direction reference E|cos| = {res['expected_random_abs_cos']:.4f}; wrote {out / 'gap_alignment.json'}"
    )
    return 0


entry = console_script(main)
