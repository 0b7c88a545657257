"""``--post app:RULE[,FLAG...]``: APP-merge the trained projector into its initial state after training.

Two refusals protect the merged export (each one line, each lifted by a flag of the spec):

* **No stage-1 anchor.** Without ``--init-from`` the projector's initial state (θ_pre) is its random
  initialisation, so τ = θ_ft − θ_pre is the whole trained projector and "preserving the anchor"
  means keeping random weights. Lift with ``allow_random_anchor``.
* **Co-adapted parts.** When adapters, LM weights or method modules (``lora``, ``gap_init``, ``mores``,
  ``full``) trained in the same run as the projector, they adapted to the *unfiltered* projector;
  an export pairing them with the filtered one was never trained. APP is defined for projector-only
  fine-tuning (the LLM stays frozen), so train a ``--method projector`` run for it. Lift with
  ``allow_coadapted``.

``force`` lifts both. :func:`check_app_run` is also the post-processor's ``check`` hook: called
before training (``check_postprocessors``), it makes a refused run fail at startup.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import APP_SPEC_HELP, export_slug, parse_app_spec, split_post_spec
from .io import summarize
from .merge import app_merge


def check_app_run(config, spec: str, trainable_names) -> dict:
    """Raise ``ValueError`` when ``--post app:SPEC`` must refuse this run; else return
    ``{"rule", "flags", "warnings"}`` (the warnings name each refusal a flag lifted)."""
    rule, flags = split_post_spec(spec)
    parse_app_spec(rule)
    names = list(trainable_names)
    method = getattr(config, "method", "?")
    if not any(n.startswith("projector.") for n in names):
        raise ValueError(f"app: the projector was not trainable in this run (method {method!r}), so there is no "
                         "task vector to filter; use --method projector without --freeze-projector")
    warnings = []
    others = [n for n in names if not n.startswith("projector.")]
    if others:
        what = (f"app: method {method!r} trains {len(others)} tensors besides the projector (e.g. {others[0]}); they "
                "co-adapt to the unfiltered projector, so an export pairing them with the APP-filtered projector was "
                "never trained")
        if "allow_coadapted" not in flags:
            raise ValueError(f"{what}. Train a projector-only run for APP (--method projector --init-from "
                             f"STAGE1_EXPORT), or add ',allow_coadapted' to the spec (app:{rule},allow_coadapted)")
        warnings.append(what + " (allowed by allow_coadapted)")
    if getattr(config, "init_from", None) is None:
        what = ("app: this run has no --init-from, so theta_pre is the projector's random initialisation and the "
                "task vector is the whole trained projector")
        if "allow_random_anchor" not in flags:
            raise ValueError(f"{what}. Pass the stage-1 export with --init-from, or add ',allow_random_anchor' to the "
                             f"spec (app:{rule},allow_random_anchor)")
        warnings.append(what + " (allowed by allow_random_anchor)")
    return {"rule": rule, "flags": sorted(flags), "warnings": warnings}


def run_app_post(ctx, spec: str) -> dict:
    """Merge the trained projector into its initial state and export it.

    θ_pre = the projector right after the method's ``prepare`` (the ``--init-from`` stage-1 projector),
    θ_ft = the trained projector. Writes ``<output_dir>/export_app-<slug>/`` (a full export with the
    merged projector and ``app_report.json``) and ``<output_dir>/projector_pre.safetensors`` (θ_pre,
    for re-merging with ``pipelines/merge.py``). The raw export stays in ``export/``.
    """
    from safetensors.torch import save_file

    checked = check_app_run(ctx.config, spec, list(ctx.initial_trainable))
    for w in checked["warnings"]:
        ctx.log(w)
    rule = checked["rule"]
    cfg = parse_app_spec(rule)
    pre = {k[len("projector."):]: v for k, v in ctx.initial_trainable.items() if k.startswith("projector.")}
    ft = {k: v.detach().cpu().float() for k, v in ctx.model.projector.state_dict().items()}
    merged, report = app_merge(pre, ft, cfg)
    pre_file = Path(ctx.output_dir) / "projector_pre.safetensors"
    save_file({k: v.contiguous() for k, v in pre.items()}, str(pre_file))
    out = ctx.write_export(Path(ctx.output_dir) / f"export_app-{export_slug(rule)}", projector_state=merged)
    report["inputs"] = {"pre": str(pre_file), "ft": str(Path(ctx.export_dir) / "projector.safetensors")}
    report["output"] = str(out)
    report["overrides"] = {"flags": checked["flags"], "warnings": checked["warnings"]}
    (Path(out) / "app_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    for line in summarize(report):
        ctx.log(f"app[{rule}]: {line}")
    brief = {n: {k: v for k, v in t.items() if k != "spectrum"} for n, t in report["tensors"].items()}
    return {"export": str(out), "config": report["config"], "totals": report["totals"], "tensors": brief,
            "overrides": report["overrides"]}


def register() -> None:
    from ..registry import register_postprocessor

    register_postprocessor(
        "app", run_app_post, check=check_app_run,
        description=f"APP projector merge against the initial projector; SPEC: RULE[,FLAG...], RULE: {APP_SPEC_HELP}; "
                    "FLAG: allow_random_anchor | allow_coadapted | force (see docs/METHODS.md)",
    )
