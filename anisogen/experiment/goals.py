"""The issue's goals, checked against an experiment's results with 95 % CIs (reported, never tuned for).

Every row says *holds* when its whole CI is on the goal's side, *fails* when it is wholly on the other
side, else *undecided* (:func:`anisogen.experiment.probe.verdict`):

* stage 1 -- AnisoAlign >= 95 % of Oracle, AnisoAlign > each other aligner: on the transfer probe
  (per-scene scores, paired bootstrap over scenes) and on the captioners (per-scene caption accuracy
  of every seed, paired bootstrap over scenes that also resamples each side's seeds);
* stage 2 -- APP > naive task vector and MoReS within 2 points of LoRA r8 (paired bootstrap over the
  held-out questions) at >= 20x fewer trainable parameters; Gap-Init seed std < random rank-1 LoRA seed
  std (F-distribution CI of the std ratio over the seeds).
"""

from __future__ import annotations

import numpy as np

from .probe import paired_bootstrap, std_ratio_ci, verdict

SPLITS = {"heldout": "held-out", "novel": "novel split"}
MORES_MARGIN, MORES_PARAM_RATIO = 0.02, 20.0


def _diff_row(goal: str, ci: dict, threshold: float = 0.0) -> dict:
    return {"goal": goal, "measured": f"{ci['estimate']:+.4f}", "ci": f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}]",
            "half_width": ci["half_width"], "verdict": verdict(ci, threshold)}


def _ratio_row(goal: str, ci: dict, threshold: float) -> dict:
    return {"goal": goal, "measured": f"{100 * ci['estimate']:.1f}%",
            "ci": f"[{100 * ci['lo']:.1f}%, {100 * ci['hi']:.1f}%]", "half_width": ci["half_width"],
            "verdict": verdict(ci, threshold)}


def _stage1_metrics(s1: dict, split: str):
    """(label, scores(name) -> per-scene array or None) for the probe and the captioners."""
    def probe(n):
        p = s1.get(n, {}).get("probe", {}).get("linear", {}).get(split)
        return None if p is None else np.asarray(p["per_scene"])

    def mllm(n):
        m = s1.get(n, {}).get("mllm", {}).get(split)
        return None if m is None else np.asarray(m["per_scene"])

    return ((f"probe (linear), {SPLITS[split]}", probe), (f"MLLM caption accuracy, {SPLITS[split]}", mllm))


def stage1_goals(s1: dict, others=("realign", "unicorn", "c3", "identity")) -> list[dict]:
    rows = []
    for split in SPLITS:
        for label, scores in _stage1_metrics(s1, split):
            a, o = scores("anisoalign"), scores("oracle")
            if a is None:
                continue
            if o is not None:
                rows.append(
                    _ratio_row(f"AnisoAlign ≥ 95% of Oracle — {label}", paired_bootstrap(a, o, ratio=True), 0.95)
                )
            for other in others:
                b = scores(other)
                if b is not None:
                    rows.append(_diff_row(f"AnisoAlign > {other} — {label}", paired_bootstrap(a, b)))
    return rows


def stage2_goals(s2: dict) -> list[dict]:
    rows = []
    m = s2["merge"]
    app = next(k for k in m if k.startswith("APP"))
    ci = paired_bootstrap(m[app]["per_question"], m["naive task vector"]["per_question"])
    rows.append(_diff_row(f"{app} > naive task vector — QA accuracy", ci))
    g = s2["seeds"]["gap_init r1"]["qa_accuracy"]["values"]
    lo = s2["seeds"]["lora-r1 (random init)"]["qa_accuracy"]["values"]
    if len(g) > 1 and len(lo) > 1:
        ci = std_ratio_ci(g, lo)
        rows.append({"goal": "Gap-Init seed std < random-init rank-1 LoRA seed std — std ratio of QA accuracy",
                     "measured": f"{ci['estimate']:.2f}", "ci": f"[{ci['lo']:.2f}, {ci['hi']:.2f}]",
                     "half_width": ci["half_width"], "verdict": verdict(ci, 1.0, greater=False)})
    p = s2["peft"]
    mo, lr8 = p["MoReS r1"], p["LoRA r8"]
    ci = paired_bootstrap(mo["per_question"], lr8["per_question"])
    ratio = lr8["trainable_parameters"] / max(1, mo["trainable_parameters"])
    row = _diff_row(f"MoReS within {100 * MORES_MARGIN:.0f} points of LoRA r8 at ≥ {MORES_PARAM_RATIO:.0f}× fewer "
                    f"parameters — QA accuracy (MoReS − LoRA)", ci, -MORES_MARGIN)
    row["measured"] += f", {ratio:.0f}× fewer parameters"
    if ratio < MORES_PARAM_RATIO:
        row["verdict"] = "fails"
    rows.append(row)
    return rows


def evaluate_goals(res: dict) -> list[dict]:
    """``[{"goal", "measured", "ci", "half_width", "verdict"}]`` for every goal whose runs are in ``res``."""
    rows = stage1_goals(res["stage1"])
    if res.get("stage2"):
        rows += stage2_goals(res["stage2"])
    return rows
