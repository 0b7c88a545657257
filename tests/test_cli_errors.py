"""Every pipeline follows one error convention (anisogen/cli.py): a user error is one line ``error: ...`` on
stderr and exit status 2, with no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anisogen.cli import UserError, one_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
NOPE = "/no/such/path"

#: script -> arguments that make a user error, and a word the one-line message must hold
CASES = {
    "analyze.py": (["spectrum", "--pre", NOPE, "--ft", NOPE, "--out-dir", "{tmp}/a"], NOPE),
    "audit.py": (["--shards", NOPE, "--images", NOPE, "--out", "{tmp}/b"], NOPE),
    "compare_aligners.py": ([], "--synthetic"),
    "embed_images.py": (["--images", NOPE, "--model", "toy", "--pretrained", "random", "--out", "{tmp}/c"], NOPE),
    "embed_texts.py": (["--corpus", NOPE + ".jsonl", "--model", "toy", "--pretrained", "random", "--out", "{tmp}/d"],
                       NOPE),
    "evaluate.py": (["--export", NOPE, "--shards", NOPE, "--out", "{tmp}/e"], NOPE),
    "experiment.py": (["--readme", "README.md", "--doc", ""], "--readme needs --doc"),
    "fit.py": (["--aligner", "centroid", "--texts", NOPE, "--images", NOPE, "--out", "{tmp}/f"], NOPE),
    "gap_study.py": (["--from-json", NOPE], NOPE),
    "generate.py": (["--corpus", "{tmp}/c.jsonl", "--out", "{tmp}/g", "--aligner", "nope", "--images", NOPE],
                    "unknown aligner"),
    "make_toy_corpora.py": (["--out", "{tmp}/file"], "exists"),
    "merge.py": (["--pre", NOPE, "--ft", NOPE, "--out", "{tmp}/h"], NOPE),
    "train.py": (["--train-shards", NOPE, "--output-dir", "{tmp}/i"], NOPE),
    "train_toyclip.py": (["--eval-only", "--out", NOPE + ".safetensors"], NOPE),
}
NOT_COVERED = {"demo.py": "takes no user paths that it does not create itself (it builds its own toy world)"}


def test_every_pipeline_is_covered():
    scripts = {p.name for p in (ROOT / "pipelines").glob("*.py")}
    assert scripts == set(CASES) | set(NOT_COVERED)


@pytest.mark.parametrize("script", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(script, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a red cube"}\n')
    (tmp_path / "file").write_text("not a folder")
    args, needle = CASES[script]
    args = [a.format(tmp=tmp_path) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr[-3000:]


def test_run_cli_convention(capsys):
    def user():
        raise UserError("--flag x: bad value\n  (spread over lines)")

    def internal():
        raise KeyError("bug")

    assert run_cli(user) == 2
    assert capsys.readouterr().err == "error: --flag x: bad value (spread over lines)\n"
    with pytest.raises(KeyError):
        run_cli(internal)
    assert run_cli(lambda: None) == 0 and run_cli(lambda: 3) == 3
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x")) == "/x: No such file or directory"


def test_deprecated_aliases_still_work_with_one_warning(capsys):
    from anisogen.generate.cli import build_parser

    p = build_parser()
    args = p.parse_args(["--corpus", "c.jsonl", "--out", "o", "--aligner-dir", "a", "--worker-index", "1",
                         "--num-workers", "3", "--aligner-param", "x=1", "--param", "y=2"])
    assert (args.worker_index, args.num_workers) == (1, 3) and args.aligner_param == [("x", 1), ("y", 2)]
    err = capsys.readouterr().err
    assert err.count("is deprecated") == 3 and "--worker-index is deprecated, use --job-index" in err
    assert "--worker-index" not in p.format_help() and "--job-index" in p.format_help()


def test_device_auto_is_the_default(monkeypatch):
    import torch

    from anisogen.cli import resolve_device
    from anisogen.generate.cli import build_parser, config_from_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    args = build_parser().parse_args(["--corpus", "c.jsonl", "--out", "o", "--aligner-dir", "a"])
    assert args.device == "auto" and config_from_args(args).device is None  # the accelerate process's device
