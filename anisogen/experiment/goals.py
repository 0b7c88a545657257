"""The issue's goals, checked against an experiment's results (reported, never tuned for)."""

from __future__ import annotations


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
