"""generate.py as a user meets it: one-line errors with exit 2 for user errors, exit 1 for an empty result,
no lock-out from a run that wrote nothing, and resume that ignores ``touch``."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_utils import write_corpus, write_images  # noqa: E402

from anisogen.align import fit_aligner  # noqa: E402
from anisogen.generate.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    write_corpus(tmp / "corpus.jsonl", n=60)
    write_images(tmp / "img.npy")
    return tmp


def run(files: Path, out: str, *extra: str) -> int:
    base = ["--corpus", str(files / "corpus.jsonl"), "--id-field", "id", "--model", "toy", "--pretrained", "random",
            "--out", str(files / out), "--samples-per-shard", "30", "--batch-size", "16", "--threads", "1",
            "--workers", "0", "--cache-dir", str(files / "hf-cache"), "--no-progress", "--fit-samples", "40"]
    return cli_main(base + list(extra))


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("extra, needles", [
    (["--aligner", "nope", "--images", "IMG"], ["--aligner", "unknown aligner 'nope'"]),
    (["--aligner", "centroid", "--images", "IMG", "--aligner-param", "bogus=1"], ["--param", "bogus"]),
    (["--aligner", "centroid", "--images", "/no/such/images.npy"], ["--images /no/such/images.npy", "no such file"]),
    (["--aligner-dir", "/no/such/aligner"], ["--aligner-dir /no/such/aligner", "config.json"]),
    (["--aligner", "centroid", "--images", "IMG", "--model", "no-such-model"], ["--model no-such-model"]),
])
def test_user_errors_are_one_line_with_exit_2(files, capsys, extra, needles):
    extra = [str(files / "img.npy") if a == "IMG" else a for a in extra]
    assert run(files, "bad", *extra) == 2
    one_line_error(capsys, *needles)


def test_aligner_fitted_for_another_model_is_a_one_line_error(files, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 128))
    fit_aligner("centroid", text=x, image=x + 1, normalize=True, model_fingerprint="some-other-model").save(
        files / "other-aligner")
    assert run(files, "other", "--aligner-dir", str(files / "other-aligner")) == 2
    one_line_error(capsys, "--aligner-dir", "some-other-model", "refit")


def test_corrupt_manifest_in_out_is_a_one_line_error(files, capsys):
    (files / "corrupt").mkdir()
    (files / "corrupt" / "manifest.json").write_text("{not json")
    assert run(files, "corrupt", "--aligner", "centroid", "--images", str(files / "img.npy")) == 2
    one_line_error(capsys, "manifest.json is not valid JSON", "--overwrite")


def test_a_failed_run_that_wrote_nothing_does_not_lock_out(files, capsys):
    bad_images = files / "bad-images.npy"
    np.save(bad_images, np.ones((10, 7), np.float32))  # wrong d: the fit fails after the manifest exists
    assert run(files, "nolock", "--aligner", "centroid", "--images", str(bad_images)) == 2
    one_line_error(capsys, "--images", "d=7")
    assert (files / "nolock" / "manifest.json").is_file()
    assert run(files, "nolock", "--aligner", "centroid", "--images", str(files / "img.npy")) == 0
    assert json.loads((files / "nolock" / "manifest.json").read_text())["status"] == "complete"


def test_touching_the_corpus_does_not_block_resume(files, capsys):
    args = ("--aligner", "centroid", "--images", str(files / "img.npy"))
    assert run(files, "touched", *args) == 0
    later = time.time() + 100
    os.utime(files / "corpus.jsonl", (later, later))
    assert run(files, "touched", *args) == 0  # same content: same fingerprint, nothing to redo
    assert "error" not in capsys.readouterr().err


def test_empty_result_exits_1_unless_allowed(files, capsys):
    (files / "empty.jsonl").write_text('{"text": ""}\n{"caption": "no text field"}\n\n')
    base = ["--corpus", str(files / "empty.jsonl"), "--model", "toy", "--pretrained", "random", "--threads", "1",
            "--workers", "0", "--cache-dir", str(files / "hf-cache"), "--no-progress", "--aligner-dir"]
    aligner = files / "aligner-ok"
    if not aligner.exists():
        assert run(files, "fit-ok", "--aligner", "centroid", "--images", str(files / "img.npy"), "--fit-only") == 0
        aligner = files / "fit-ok" / "aligner"
    assert cli_main(base + [str(aligner), "--out", str(files / "empty-out")]) == 1
    one_line_error(capsys, "no sample was written", "rejects.jsonl", "--allow-empty")
    assert cli_main(base + [str(aligner), "--out", str(files / "empty-out"), "--allow-empty"]) == 0


def test_help_does_not_import_torch_or_open_clip():
    import subprocess

    code = ("import sys; from anisogen.generate.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'open_clip', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_importing_open_clip_after_anisogen_registers_the_toy_config():
    import subprocess

    code = "import anisogen, open_clip; print('toy' in open_clip.list_models())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
