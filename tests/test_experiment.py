"""The text-only-training experiment (issue 9) in reduced form, plus its scoring functions.

The module fixture runs ``pipelines/experiment.py --preset ci`` once (the same code paths as the full
experiment at small sizes) and the tests check the results, the tables and the generated document.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

from anisogen.experiment.scoring import CAPTION_ATTRIBUTES, caption_scores, pope_scores, qa_correct, yes_no  # noqa: E402
from anisogen.toyworld import Scene, SceneObject  # noqa: E402


# ------------------------------------------------------------------------------------------ scoring

def _scene(*objs, bg="black"):
    return Scene(objects=tuple(SceneObject(*o) for o in objs), background=bg, render_seed=1)


def test_caption_scores_exact_values():
    s2 = _scene(("star", "red", "large", "top left"), ("circle", "blue", "small", "center"))
    s1 = _scene(("heart", "green", "small", "bottom right"))
    gens = ["two objects: a large red star in the top left and a small blue circle in the center",
            "a red heart"]
    r = caption_scores(gens, [s2, s1])
    # caption 1 names everything right; caption 2: colour {red} vs {green} -> 0, shape {heart} -> 1,
    # size / position not named -> 0, count not stated -> 0
    assert r["color"] == pytest.approx((1.0 + 0.0) / 2)
    assert r["shape"] == pytest.approx(1.0)
    assert r["size"] == pytest.approx(0.5) and r["position"] == pytest.approx(0.5)
    assert r["count"] == pytest.approx(0.5)
    assert r["mean"] == pytest.approx(np.mean([0.5, 1.0, 0.5, 0.5, 0.5]))
    # named words: caption 1: 2 colours + 2 shapes + 2 sizes + 2 regions, all true; caption 2: red (false), heart
    assert r["precision"] == pytest.approx(9 / 10)
    # partial credit: F1 of {red} against {red, blue} = 2*1/(1+2)
    r = caption_scores(["a red thing"], [s2])
    assert r["color"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="captions for"):
        caption_scores(["x"], [s1, s2])


def test_qa_and_pope_scoring():
    assert qa_correct("color", "red", "The star is red.")
    assert not qa_correct("color", "red", "red and blue")  # names another colour
    assert qa_correct("shape", "diamond", "it is a rhombus")
    assert qa_correct("count", 2, "There are two.") and not qa_correct("count", 2, "three")
    assert qa_correct("count_shape", 0, "zero.")
    assert qa_correct("position", "top left", "in the upper left")
    assert qa_correct("background", "charcoal", "the background is dark gray")
    assert qa_correct("exists", "no", "No.") and not qa_correct("exists", "no", "yes")
    assert yes_no("  Yes, there is") == "yes" and yes_no("maybe") is None
    with pytest.raises(ValueError, match="cannot score"):
        qa_correct("describe", "x", "y")
    p = pope_scores(["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "no", None])
    assert p["accuracy"] == pytest.approx(2 / 5)
    assert p["precision"] == pytest.approx(1 / 2) and p["recall"] == pytest.approx(1 / 2)
    assert p["f1"] == pytest.approx(0.5) and p["yes_ratio"] == pytest.approx(2 / 5)


# ------------------------------------------------------------------------------------------ the run

@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import experiment  # the CLI

    out = tmp_path_factory.mktemp("experiment")
    doc = out / "EXPERIMENTS.md"
    assert experiment.main(["--preset", "ci", "--out", str(out), "--doc", str(doc)]) == 0
    res = json.loads((out / "results.json").read_text())
    return out, doc, res


def test_stage1_has_every_row_and_finite_metrics(ci_run):
    _, _, res = ci_run
    s1 = res["stage1"]
    assert list(s1) == [*res["config"]["aligners"], "oracle", "blind"]
    for name, r in s1.items():
        a = r["attributes"]
        assert a["n"] == res["config"]["n_eval"] == len(r["samples"])
        for k in (*CAPTION_ATTRIBUTES, "mean"):
            assert 0.0 <= a[k] <= 1.0, (name, k)
        assert math.isfinite(r["caption_loss"]) and r["caption_loss"] > 0
        assert Path(r["export_dir"], "projector.safetensors").is_file()


def test_transfer_probe_in_the_study(ci_run):
    from anisogen.experiment.goals import caption_scores, probe_goals

    _, doc, res = ci_run
    s1, cfg = res["stage1"], res["config"]
    for name, r in s1.items():
        pr = r["probe"]
        for kind in ("linear", "mlp"):
            for split, n in (("heldout", cfg["n_eval"]), ("novel", cfg["n_novel"])):
                sc = pr[kind][split]
                assert len(sc["per_scene"]) == n and 0.0 <= sc["mean"] <= 1.0
                assert sc["mean"] == pytest.approx(sum(sc["per_scene"]) / n)
        # retrieval needs a text side: every aligner and Blind, never Oracle
        assert ("retrieval" in pr) == (name != "oracle")
    # real image embeddings carry the attributes; a constant vector does not
    assert s1["oracle"]["probe"]["linear"]["heldout"]["mean"] > s1["blind"]["probe"]["linear"]["heldout"]["mean"] + 0.1
    assert s1["blind"]["probe"]["retrieval"]["r1"] == 0.0  # all ties rank last
    assert s1["anisoalign"]["probe"]["retrieval"]["r1"] > s1["blind"]["probe"]["retrieval"]["r1"]
    goals = probe_goals(s1)
    assert goals and {g["verdict"] for g in goals} <= {"holds", "fails", "undecided"}
    assert len(caption_scores(s1["oracle"])) == cfg["n_eval"]
    text = doc.read_text()
    assert "### Transfer probe" in text and "95% CI" in text


def test_oracle_beats_blind(ci_run):
    _, _, res = ci_run
    o, b = res["stage1"]["oracle"], res["stage1"]["blind"]
    assert o["attributes"]["mean"] > b["attributes"]["mean"]
    # (the caption losses of the two are within 0.2% at CI sizes: not asserted, see docs/EXPERIMENTS.md)
    # Blind sees one constant vector: its captions cannot depend on the scene
    assert len({s["generated"] for s in b["samples"]}) == 1


def test_substitutes_move_towards_images(ci_run):
    _, _, res = ci_run
    s1 = res["stage1"]
    # every centring aligner brings the substitutes closer to the real image of the same scene than raw text
    for name in ("realign", "anisoalign"):
        assert s1[name]["substitute_cosine_to_image"] > s1["identity"]["substitute_cosine_to_image"]
    assert s1["oracle"]["substitute_cosine_to_image"] == pytest.approx(1.0, abs=1e-5)


def test_stage2_tables_and_parameter_counts(ci_run):
    _, _, res = ci_run
    s2, cfg = res["stage2"], res["config"]
    assert set(s2["merge"]) == {"stage1 (theta_pre)", "naive task vector", f"APP {cfg['app_spec']}"}
    for r in s2["merge"].values():
        assert 0.0 <= r["qa_accuracy"] <= 1.0 and r["pope"]["n"] > 0
    for tag in ("lora-r1 (random init)", "gap_init r1"):
        runs = s2["seeds"][tag]["runs"]
        assert [r["seed"] for r in runs] == cfg["stage2_seeds"]
        vals = [r["qa_accuracy"] for r in runs]
        assert s2["seeds"][tag]["qa_accuracy"]["mean"] == pytest.approx(np.mean(vals))
        assert s2["seeds"][tag]["qa_accuracy"]["std"] == pytest.approx(np.std(vals, ddof=1))
    L, D, F = cfg["lm_layers"], cfg["lm_hidden"], 2 * cfg["lm_hidden"]
    # MoReS rank 1 on every layer: L * r * (2D + 1) (R, W: r x D; b: r)
    assert s2["peft"]["MoReS r1"]["trainable_parameters"] == L * 1 * (2 * D + 1)
    # LoRA r8 on q,k,v,o (all D -> D): L * 4 * r * (D + D)
    assert s2["peft"]["LoRA r8"]["trainable_parameters"] == L * 4 * 8 * (2 * D)
    # rank 1 on q,k,v,o,gate,up,down: 4 (D + D) + 2 (D + F) + (F + D) per layer
    r1 = L * (4 * 2 * D + 3 * (D + F))
    assert s2["seeds"]["lora-r1 (random init)"]["trainable_parameters"] == r1
    assert s2["seeds"]["gap_init r1"]["trainable_parameters"] == r1


def test_document_is_written(ci_run):
    _, doc, res = ci_run
    text = doc.read_text()
    assert text.startswith("# Experiments")
    assert "python pipelines/experiment.py --preset ci" in text
    for name in res["stage1"]:
        assert f"| {name} |" in text or f"| **{name}** |" in text
    for section in ("## Stage 1", "### Projector-only tuning", "### Rank-1 LoRA", "### MoReS rank 1", "## Goals",
                    "## Analysis", "## SmolLM2-135M"):
        assert section in text
    assert "qualitative" in text
    assert "47.49" in text  # the paper's AnisoAlign Table 1 average sits beside ours
    # every goal row is present with a verdict
    for other in ("realign", "identity"):
        assert f"| AnisoAlign beats {other} |" in text
    assert "Gap-Init seed std" in text and "APP beats the naive task vector" in text


def test_report_only_rerenders_the_same_document(ci_run, tmp_path):
    out, doc, _ = ci_run
    import experiment

    again = tmp_path / "again.md"
    assert experiment.main(["--report-only", "--out", str(out), "--doc", str(again)]) == 0
    assert again.read_text() == doc.read_text()


def test_stage1_run_is_deterministic(ci_run, tmp_path):
    out, _, res = ci_run
    from anisogen.experiment.runs import evaluate_captions, train_run
    from anisogen.experiment.config import preset
    from anisogen.experiment.world import build_world

    cfg = preset("ci", str(out))
    data = out / "stage1" / "oracle" / "data"
    s = train_run(tmp_path / "oracle", lm=str(out / "lm"), train_jsonl=str(data / "captions.jsonl"),
                  emb_npy=str(data / "emb.npy"), template="plain", steps=cfg.stage1_steps,
                  batch_size=cfg.stage1_batch, lr=cfg.stage1_lr, seed=cfg.seed)
    first = Path(res["stage1"]["oracle"]["export_dir"], "projector.safetensors").read_bytes()
    assert Path(s["export_dir"], "projector.safetensors").read_bytes() == first
    world = build_world(cfg, log=lambda *_: None)  # from the cache: same embeddings
    ev = evaluate_captions(s["export_dir"], world.eval_emb, world.eval_scenes, world.eval_captions,
                           max_new_tokens=cfg.caption_tokens, batch_size=cfg.eval_batch)
    assert [x["generated"] for x in ev["samples"]] == [x["generated"] for x in res["stage1"]["oracle"]["samples"]]
    assert ev["attributes"]["mean"] == res["stage1"]["oracle"]["attributes"]["mean"]
