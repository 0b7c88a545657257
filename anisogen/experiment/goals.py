"""The issue's goals, checked against an experiment's results (reported, never tuned for)."""

from __future__ import annotations

import numpy as np

from .probe import paired_bootstrap, verdict
from .scoring import CAPTION_ATTRIBUTES


def caption_scores(run: dict) -> np.ndarray:
    """Per-scene mean caption attribute score of a stage-1 run (the MLLM metric, paired by scene)."""
    return np.array([np.mean([smp[a] for a in CAPTION_ATTRIBUTES]) for smp in run["samples"]])


def probe_goals(s1: dict, kind: str = "linear", split: str = "heldout") -> list[dict]:
    """Goals on the transfer probe and on the MLLM metric with paired bootstrap 95 % CIs (same scenes for
    both sides): ``{"goal", "measured", "ci", "verdict"}``; verdict holds / fails / undecided."""
    if "anisoalign" not in s1 or "probe" not in s1["anisoalign"]:
        return []
    ps = lambda n: np.array(s1[n]["probe"][kind][split]["per_scene"])  # noqa: E731
    out = []
    for label, scores in ((f"probe ({kind}, {split})", ps), ("MLLM caption attributes", lambda n: caption_scores(s1[n]))):
        a, o = scores("anisoalign"), scores("oracle")
        ci = paired_bootstrap(a, o, ratio=True)
        out.append({"goal": f"AnisoAlign ≥ 95% of Oracle — {label}", "measured": f"{100 * ci['estimate']:.1f}%",
                    "ci": f"[{100 * ci['lo']:.1f}%, {100 * ci['hi']:.1f}%]", "verdict": verdict(ci, 0.95)})
        for other in ("realign", "unicorn"):
            if other in s1:
                ci = paired_bootstrap(a, scores(other))
                out.append({"goal": f"AnisoAlign > {other} — {label}", "measured": f"{ci['estimate']:+.4f}",
                            "ci": f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}] (half-width {ci['half_width']:.4f})",
                            "verdict": verdict(ci, 0.0)})
    return out


def evaluate_goals(res: dict) -> list[dict]:
    """``[{"goal", "measured", "holds"}]`` for every goal whose runs are present in ``res``."""
    s1, s2 = res["stage1"], res.get("stage2")
    goals = []
    if "anisoalign" in s1:
        a = s1["anisoalign"]["attributes"]["mean"]
        o = s1["oracle"]["attributes"]["mean"]
        goals.append({"goal": "AnisoAlign attribute accuracy ≥ 95% of Oracle",
                      "measured": f"{a:.3f} / {o:.3f} = {100 * a / o:.1f}%" if o > 0 else f"{a:.3f} / {o:.3f}",
                      "holds": bool(o > 0 and a >= 0.95 * o)})
        for other in ("realign", "c3", "identity"):
            if other in s1:
                b = s1[other]["attributes"]["mean"]
                goals.append({"goal": f"AnisoAlign beats {other}", "measured": f"{a:.3f} vs {b:.3f}", "holds": bool(a > b)})
    if s2:
        g = s2["seeds"]["gap_init r1"]["qa_accuracy"]["std"]
        l = s2["seeds"]["lora-r1 (random init)"]["qa_accuracy"]["std"]
        goals.append({"goal": "Gap-Init seed std < random-init rank-1 LoRA seed std (QA acc)",
                      "measured": f"{g:.4f} vs {l:.4f}", "holds": bool(g < l)})
        m = s2["merge"]
        app = next(k for k in m if k.startswith("APP"))
        x, y = m[app]["qa_accuracy"], m["naive task vector"]["qa_accuracy"]
        goals.append({"goal": "APP beats the naive task vector (QA acc)", "measured": f"{x:.3f} vs {y:.3f}",
                      "holds": bool(x > y)})
    return goals
