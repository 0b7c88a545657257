"""pipelines/fit.py (anisogen.commands.fit): fit any registered aligner from .npy files / folders / shard folders."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anisogen.align import fit_aligner, load_aligner
from anisogen.commands import fit as fit_cli
from anisogen.shards import schema, writer
from anisogen.synthetic import make_paired_embeddings

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--param", "rank=4", "--param", "score_hidden=16", "--param", "score_layers=1", "--param", "refiner_hidden=16",
        "--param", "refiner_layers=1", "--param", "stage1_steps=20", "--param", "stage2_steps=20",
        "--param", "batch_size=128", "--param", "eval_every=10", "--param", "radial_knots=128",
        "--param", "stage1_batch_size=128", "--param", "stage1_eval_every=10", "--param", "stage1_patience=null"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    pairs = make_paired_embeddings(4000, 16, gap=0.5, residual_rank=2, seed=2)
    fit_text, fit_image, held = pairs.split(2000, seed=0, keep_antithetic=True)
    np.save(d / "text.npy", fit_text.astype(np.float32))
    np.save(d / "image.npy", fit_image.astype(np.float32))
    np.save(d / "held_text.npy", held.text.astype(np.float32))
    np.save(d / "held_image.npy", held.image.astype(np.float32))
    return d, held


def run_cli(capsys, *argv):
    code = fit_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_writes_the_artifact_identical_to_the_library_fit(files, tmp_path, capsys):
    d, held = files
    code, out, err = run_cli(capsys, "--aligner", "anisoalign-init", "--texts", d / "text.npy", "--images",
                             d / "image.npy", "--out", tmp_path / "art", "--seed", 3, "--param", "rank=4",
                             "--model-fingerprint", "toy:1", "--json", tmp_path / "diag.json", "--no-progress")
    assert code == 0, err
    text = np.load(d / "text.npy").astype(np.float64)
    image = np.load(d / "image.npy").astype(np.float64)
    direct = fit_aligner("anisoalign-init", text=text, image=image, seed=3, rank=4)
    loaded = load_aligner(tmp_path / "art", model_fingerprint="toy:1")
    np.testing.assert_array_equal(loaded.transform(held.text), direct.transform(held.text))
    assert "inputs: 1000 texts, 1000 images, d = 16" in out
    assert "Unpaired diagnostics" in out and "No trained stages" in out
    diag = json.loads((tmp_path / "diag.json").read_text())
    # the unpaired centroid gap equals an independent computation
    assert diag["unpaired_report"]["G_mu"] == pytest.approx(np.linalg.norm(image.mean(0) - text.mean(0)), abs=1e-6)
    assert diag["unpaired_report"]["trace_text"] == pytest.approx(np.trace(np.cov(text.T, bias=True)), rel=1e-5)
    # an existing artifact is not replaced silently
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", "--images", d / "image.npy",
                           "--out", tmp_path / "art")
    assert code == 2 and "already holds an aligner artifact; pass --overwrite" in err
    code, _, _ = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", "--images", d / "image.npy",
                         "--out", tmp_path / "art", "--overwrite")
    assert code == 0 and load_aligner(tmp_path / "art").name == "realign"


def test_paired_inputs_print_the_gap_report_and_trained_stages_their_curves(files, tmp_path, capsys):
    d, held = files
    code, out, err = run_cli(capsys, "--aligner", "anisoalign", "--texts", d / "held_text.npy", "--images",
                             d / "held_image.npy", "--paired", "--out", tmp_path / "a", "--json", tmp_path / "j.json",
                             "--no-progress", *TINY)
    assert code == 0, err
    assert "Modality gap of the first 2000 paired rows" in out
    diag = json.loads((tmp_path / "j.json").read_text())
    assert diag["gap_report"]["G_mu"] == pytest.approx(0.5, abs=1e-6)  # planted gap, exact with antithetic pairs
    # one refiner per lambda_Phi candidate of the automatic selection, each with its curves
    for curve in ("stage1_L_I", "stage1_L_I_val", "stage2_lambda1_objective", "stage2_lambda1_L_II",
                  "stage2_lambda1_L_Phi", "stage2_lambda10_L_Phi"):
        assert f"| {curve} |" in out
    assert "Automatic selection on held-out *fit* texts and images" in out
    assert "realign (reference)" in out and out.count("<- chosen") == 1
    assert len(diag["history"]["selection"]) >= 14
    assert diag["history"]["stage1_L_I_val_step"] == [0.0, 10.0, 20.0]
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", "--images", d / "held_image.npy",
                           "--paired", "--out", tmp_path / "b")
    assert code == 2 and "--paired needs as many texts as images, got 1000 texts and 2000 images" in err


def test_bad_inputs_are_refused_naming_file_and_row(files, tmp_path, capsys):
    d, _ = files
    text = np.load(d / "text.npy")
    bad = text.copy()
    bad[41] *= 2.0
    np.save(tmp_path / "unnormed.npy", bad)
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", tmp_path / "unnormed.npy", "--images",
                           d / "image.npy", "--out", tmp_path / "x")
    assert code == 2 and f"{tmp_path / 'unnormed.npy'}: row 41 has L2 norm 2.0" in err and "--normalize" in err
    assert not (tmp_path / "x" / "config.json").exists()
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", tmp_path / "unnormed.npy", "--images",
                           d / "image.npy", "--out", tmp_path / "x", "--normalize")
    assert code == 0, err
    nan = text.copy()
    nan[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", "--images", tmp_path / "nan.npy",
                           "--out", tmp_path / "y")
    assert code == 2 and f"{tmp_path / 'nan.npy'}: row 7 contains NaN or Inf" in err
    np.save(tmp_path / "d8.npy", text[:, :8] / np.linalg.norm(text[:, :8], axis=1, keepdims=True))
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", "--images", tmp_path / "d8.npy",
                           "--out", tmp_path / "z")
    assert code == 2 and "dimension mismatch: text inputs" in err and "have d=16" in err and "have d=8" in err
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", tmp_path / "d8.npy",
                           "--images", d / "image.npy", "--out", tmp_path / "z")
    assert code == 2 and f"{tmp_path / 'd8.npy'}: dimension mismatch, expected d=16, got d=8" in err
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", tmp_path / "missing.npy", "--images",
                           d / "image.npy", "--out", tmp_path / "z")
    assert code == 2 and "does not exist" in err


def test_folders_fingerprints_and_shard_folders(files, tmp_path, capsys):
    d, held = files
    text = np.load(d / "text.npy")
    image = np.load(d / "image.npy")
    img_dir = tmp_path / "img_emb"
    img_dir.mkdir()
    np.save(img_dir / "img_emb_2.npy", image[500:].astype(np.float16))
    np.save(img_dir / "img_emb_10.npy", image[:0].reshape(0, 16).astype(np.float16)[:0])  # empty part is refused
    (img_dir / "img_emb.json").write_text(json.dumps({"model": "toy|random|sha256=0"}))
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", d / "text.npy", "--images", img_dir,
                           "--out", tmp_path / "e")
    assert code == 2 and "img_emb_10.npy: no rows" in err
    np.save(img_dir / "img_emb_10.npy", image[:500].astype(np.float16))
    # shard folder with raw text embeddings (src.npy), as written by generate --keep-source
    shards = tmp_path / "shards"
    shards.mkdir()
    for task, rows in enumerate((text[:600], text[600:])):
        samples = [schema.sample_members(schema.make_key(task, i), f"t{i}", schema.encode_embedding(r, "fp16"),
                                         {"id": f"doc-{i}", "row": i, "n_tokens": 3, "truncated": False,
                                          "model": "toy|random|sha256=0", "aligner": "identity"},
                                         schema.encode_embedding(r, "fp32")) for i, r in enumerate(rows)]
        entry = writer.write_shard(shards, task, samples)
        writer.write_record(shards, {**entry, "rows": [0, len(rows)], "rejects": 0, "reject_reasons": {},
                                     "reject_list": [], "stats": {}})
    writer.assemble(shards, {"dim": 16, "num_tasks": 2, "model_fingerprint": "toy|random|sha256=0"},
                    writer.list_records(shards), complete=True)
    code, out, err = run_cli(
        capsys, "--aligner", "realign", "--texts", shards, "--images", img_dir, "--out", tmp_path / "f"
    )
    assert code == 0, err
    loaded = load_aligner(tmp_path / "f", model_fingerprint="toy|random|sha256=0")
    # natural order (_2 before _10) and the fp16 image files: same fit as the in-memory arrays
    image16 = np.concatenate([image[500:], image[:500]]).astype(np.float16).astype(np.float64)
    direct = fit_aligner("realign", text=text.astype(np.float64), image=image16)
    np.testing.assert_allclose(loaded.transform(held.text), direct.transform(held.text), atol=1e-6)
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", shards, "--images", img_dir, "--out",
                           tmp_path / "g",
                           "--model-fingerprint", "ViT-B-32:other")
    assert code == 2 and "differs from the inputs' ['toy|random|sha256=0']" in err
    code, _, err = run_cli(capsys, "--aligner", "realign", "--texts", shards, "--shard-field", "emb", "--images",
                           img_dir, "--out", tmp_path / "h", "--normalize")
    assert code == 0, err


def test_runs_as_a_script(files, tmp_path):
    d, _ = files
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "fit.py"), "--aligner", "c3", "--texts",
                           str(d / "text.npy"), "--images", str(d / "image.npy"), "--out", str(tmp_path / "c3"),
                           "--param", "calibrate_phi=0.8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_aligner(tmp_path / "c3").params["calibrate_phi"] == 0.8
    assert "fitted c3 in" in proc.stdout and "Unpaired diagnostics" in proc.stdout
