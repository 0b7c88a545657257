"""The text-only-training experiment (issue 9) in reduced form, plus its scoring functions.

The module fixture runs ``pipelines/experiment.py --preset ci`` once (the same code paths as the full
experiment at small sizes) and the tests check the results, the tables and the generated document.
"""

from __future__ import annotations

import json
import math
import os
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
    # accuracy averages over the kinds each caption names: caption 1 names colour, shape, size, position and
    # count, all right -> 1; caption 2 names colour (wrong) and shape (right) -> 0.5
    assert [p["accuracy"] for p in r["per_sample"]] == pytest.approx([1.0, 0.5])
    assert r["accuracy"] == pytest.approx(0.75)
    r = caption_scores(["a red thing"], [s2])
    assert r["color"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(2 / 3)
    # the background is checked when named; a caption that names nothing scores 0
    r = caption_scores(["a green heart on a white background", "a green heart on a black background", "nothing"],
                       [s1, s1, s1])
    assert [p["accuracy"] for p in r["per_sample"]] == pytest.approx([2 / 3, 1.0, 0.0])
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
    from anisogen.commands import experiment  # the CLI

    out = tmp_path_factory.mktemp("experiment")
    doc = out / "EXPERIMENTS.md"
    assert experiment.main(["--preset", "ci", "--out", str(out), "--doc", str(doc)]) == 0
    res = json.loads((out / "results.json").read_text())
    return out, doc, res


def test_stage1_has_every_row_and_finite_metrics(ci_run):
    _, _, res = ci_run
    s1, cfg = res["stage1"], res["config"]
    assert list(s1) == [*cfg["aligners"], "oracle", "blind"]
    assert [n for n in s1 if "mllm" in s1[n]] == cfg["mllm_conditions"]
    for name in cfg["mllm_conditions"]:
        m = s1[name]["mllm"]
        assert [r["seed"] for r in m["runs"]] == cfg["stage1_seeds"]
        for split, n in (("heldout", cfg["n_eval"]), ("novel", cfg["n_novel"])):
            sp = m[split]
            assert np.shape(sp["per_scene"]) == (len(cfg["stage1_seeds"]), n)
            # the condition's accuracy is the mean over seeds of the per-seed means of the per-scene scores
            assert sp["seed_accuracy"] == pytest.approx(np.mean(sp["per_scene"], axis=1).tolist())
            assert sp["accuracy"] == pytest.approx(np.mean(sp["per_scene"]))
            for k in ("accuracy", *CAPTION_ATTRIBUTES, "mean"):
                assert 0.0 <= sp["attributes"][k] <= 1.0, (name, k)
            assert math.isfinite(sp["caption_loss"]) and sp["caption_loss"] > 0
        for r in m["runs"]:
            assert Path(r["export_dir"], "projector.safetensors").is_file()
    # a perfect captioner: the reference captions score (almost) 1
    assert res["reference_captions"]["heldout"] > 0.95


def test_transfer_probe_in_the_study(ci_run):
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
    text = doc.read_text()
    assert "### Transfer probe" in text and "95% CI" in text and "### Compositional split" in text


def test_goals_carry_intervals_and_verdicts(ci_run):
    from anisogen.experiment.goals import evaluate_goals
    from anisogen.experiment.probe import paired_bootstrap

    _, _, res = ci_run
    goals = evaluate_goals(res)
    names = [g["goal"] for g in goals]
    for want in ("AnisoAlign ≥ 95% of Oracle — MLLM caption accuracy, held-out",
                 "AnisoAlign > realign — MLLM caption accuracy, held-out",
                 "AnisoAlign > realign — probe (linear), novel split", "> naive task vector", "Gap-Init seed std",
                 "MoReS within 2 points"):
        assert any(want in n for n in names), want
    assert {g["verdict"] for g in goals} <= {"holds", "fails", "undecided"}
    # the MLLM difference row is the seed-and-scene bootstrap of the stored per-scene scores
    s1 = res["stage1"]
    ci = paired_bootstrap(
        s1["anisoalign"]["mllm"]["heldout"]["per_scene"], s1["realign"]["mllm"]["heldout"]["per_scene"]
    )
    row = next(g for g in goals if g["goal"] == "AnisoAlign > realign — MLLM caption accuracy, held-out")
    assert row["measured"] == f"{ci['estimate']:+.4f}" and row["half_width"] == pytest.approx(ci["half_width"])


def test_oracle_beats_blind(ci_run):
    _, _, res = ci_run
    o, b = res["stage1"]["oracle"]["mllm"], res["stage1"]["blind"]["mllm"]
    assert o["heldout"]["accuracy"] > b["heldout"]["accuracy"]
    # Blind sees one constant vector: its captions cannot depend on the scene
    assert len({s["generated"] for s in b["heldout"]["samples"]}) == 1


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
    for section in ("## Headline", "## Stage 1", "### Projector-only tuning", "### Rank-1 LoRA", "### MoReS rank 1",
                    "## Goals", "## SmolLM2-135M"):
        assert section in text
    assert "qualitative" in text
    assert "47.49" in text  # the paper's AnisoAlign Table 1 average sits beside ours
    # every goal row is present with its interval and a verdict
    for other in ("realign", "identity"):
        assert f"| AnisoAlign > {other} — MLLM caption accuracy, held-out |" in text
    assert "Gap-Init seed std" in text and "> naive task vector" in text and "*reference captions*" in text


def test_report_only_rerenders_the_same_document(ci_run, tmp_path):
    out, doc, _ = ci_run
    from anisogen.commands import experiment

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
    seed = cfg.stage1_seeds[0]
    kw = dict(lm=str(out / "lm"), train_jsonl=str(data / "captions.jsonl"), emb_npy=str(data / "emb.npy"),
              template="plain", steps=cfg.stage1_steps, batch_size=cfg.stage1_batch, lr=cfg.stage1_lr, seed=seed)
    s = train_run(tmp_path / "oracle", **kw)
    assert not s.get("reused")
    oracle = res["stage1"]["oracle"]["mllm"]
    first = Path(oracle["runs"][0]["export_dir"], "projector.safetensors").read_bytes()
    assert Path(s["export_dir"], "projector.safetensors").read_bytes() == first
    world = build_world(cfg, log=lambda *_: None)  # from the cache: same embeddings
    ev = evaluate_captions(s["export_dir"], world.eval_emb, world.eval_scenes, world.eval_captions,
                           max_new_tokens=cfg.caption_tokens, batch_size=cfg.eval_batch)
    assert [x["generated"] for x in ev["samples"][:12]] == [x["generated"] for x in oracle["heldout"]["samples"]]
    assert ev["attributes"]["accuracy"] == oracle["heldout"]["seed_accuracy"][0]
    # a finished run with the same settings and inputs is reused; other settings train again
    assert train_run(tmp_path / "oracle", **kw)["reused"]
    assert not train_run(tmp_path / "oracle", **{**kw, "steps": 2}).get("reused")


def test_readme_results_block_is_generated(ci_run, tmp_path):
    from anisogen.experiment.report import README_BEGIN, README_END
    from anisogen.experiment.runner import write_report

    _, _, res = ci_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_BEGIN}\nstale numbers\n{README_END}\nafter\n")
    write_report(res, str(tmp_path / "EXP.md"), str(readme))
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "stale numbers" not in text and "AnisoAlign > realign" in text and "95% CI" in text
    write_report(res, str(tmp_path / "EXP.md"), str(readme))
    assert readme.read_text() == text  # idempotent
    bare = tmp_path / "bare.md"
    bare.write_text("# no block\n")
    with pytest.raises(ValueError, match="generated results block"):
        write_report(res, str(tmp_path / "EXP.md"), str(bare))


def test_bpe_tokenizer_learned_on_text():
    from anisogen.train.tiny import build_tiny_tokenizer

    texts = ["a small red star in the top left", "a large blue circle on a black background"] * 50
    a, b = (build_tiny_tokenizer(train_texts=texts, vocab_size=400) for _ in range(2))
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()  # deterministic in the texts
    byte = build_tiny_tokenizer()
    s = "a small red star"
    assert len(a(s, add_special_tokens=False)["input_ids"]) == 4 < len(byte(s, add_special_tokens=False)["input_ids"])
    # specials keep their ids and any text still round-trips (bytes are in the base vocabulary)
    for t in ("<pad>", "<s>", "<|im_end|>", "<image>"):
        assert a.convert_tokens_to_ids(t) == byte.convert_tokens_to_ids(t)
    odd = "ünïcødé ✓ never seen"
    assert a.decode(a(odd, add_special_tokens=False)["input_ids"]) == odd
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(train_texts=texts, vocab_size=100)
