"""`make demo` in reduced form: every step runs, writes what it says, and the outputs are consistent."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from anisogen.commands import demo

ROOT = Path(__file__).resolve().parents[1]


def test_paired_set_is_joined_by_scene_id_not_by_file_order(tmp_path):
    emb = tmp_path / "emb"
    (emb / "heldout_images").mkdir(parents=True)
    (emb / "heldout_texts").mkdir(parents=True)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 3)).astype(np.float32)
    text = rng.normal(size=(4, 3)).astype(np.float32)
    # images listed in a different order than the captions
    image_order = ["held2", "held0", "held3", "held1"]
    np.save(emb / "heldout_images" / "img_emb.npy", image)
    (emb / "heldout_images" / "img_keys.txt").write_text("".join(f"/x/images/{k}.png\n" for k in image_order))
    (emb / "heldout_images" / "img_emb.json").write_text("{}")
    np.save(emb / "heldout_texts" / "text_emb.npy", text)
    (emb / "heldout_texts" / "text_ids.txt").write_text("held0\nheld1\nheld2\nheld3\n")
    out = demo.build_paired_set(tmp_path)
    paired_image = np.load(out / "image.npy")
    np.testing.assert_array_equal(paired_image, image[[1, 3, 0, 2]])
    np.testing.assert_array_equal(np.load(out / "text.npy"), text)


def test_small_demo_runs_every_step(tmp_path):
    data, shards, runs = tmp_path / "data", tmp_path / "shards", tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "pipelines" / "demo.py"), "--small", "--data", str(data),
           "--shards", str(shards), "--runs", str(runs)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for n in range(1, 7):
        assert f"== step {n}/6" in out
    assert "accelerate.commands.launch --multi_gpu --num_processes 2" in out

    scale = demo.SMALL
    # 1-2: corpora and embeddings, paired set aligned row for row
    assert sum(1 for _ in open(data / "captions.jsonl")) == scale.n_text
    image = np.load(data / "emb" / "images" / "img_emb.npy")
    assert image.shape == (scale.n_images, 128)
    paired_image = np.load(data / "emb" / "heldout_paired" / "image.npy")
    paired_text = np.load(data / "emb" / "heldout_paired" / "text.npy")
    assert paired_image.shape == paired_text.shape == (scale.n_heldout, 128)
    # the toy CLIP pairs its own held-out image and caption far above chance
    sims = paired_image @ paired_text.T
    assert (sims.argmax(axis=1) == np.arange(len(sims))).mean() > 0.2

    # 3: a complete, verified shard folder fitted with AnisoAlign by two processes
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["totals"]["samples"] == scale.n_text
    assert manifest["aligner"]["name"] == "anisoalign"
    assert manifest["last_run"]["world_size"] == 2
    from anisogen.shards import verify_folder

    verify_folder(shards)

    # 4: the audit report
    report = json.loads((runs / "audit" / "report.json").read_text())
    assert (runs / "audit" / "report.html").stat().st_size > 10_000
    assert "anisoalign" in json.dumps(report)

    # 5-6: a trained export evaluated on real held-out image embeddings
    assert (runs / "stage1" / "export").is_dir()
    ev = json.loads((runs / "eval" / "report.json").read_text())
    assert ev["n"] == scale.eval_pairs
    assert np.isfinite(ev["caption_loss"])
    assert set(ev["attributes"]) >= {"color", "shape"}
    assert "generated from the real image embedding" in out

    # a rerun reuses everything: no corpus rebuild, no new shards
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.tar")}
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "reusing" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.tar")} == before
