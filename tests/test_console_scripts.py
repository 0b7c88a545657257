"""The console scripts (``[project.scripts]``): one ``anisogen-<name>`` per ``pipelines/<name>.py``, each a thin
entry over ``anisogen.commands.<name>``; ``--help`` imports nothing heavy; renamed flags keep their old names."""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
PIPELINES = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py"))
HEAVY = ("torch", "open_clip", "faiss", "transformers", "datasets")


def test_one_console_script_per_pipeline():
    assert sorted(SCRIPTS) == sorted(f"anisogen-{name.replace('_', '-')}" for name in PIPELINES)
    for name in PIPELINES:
        assert SCRIPTS[f"anisogen-{name.replace('_', '-')}"] == f"anisogen.commands.{name}:entry"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_target_resolves_to_a_callable(script):
    module, _, attr = SCRIPTS[script].partition(":")
    mod = importlib.import_module(module)
    assert callable(getattr(mod, attr)) and callable(mod.main)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_is_a_thin_entry_point(name):
    text = (ROOT / "pipelines" / f"{name}.py").read_text()
    assert f"from anisogen.commands.{name} import main" in text
    assert 'sys.exit(run_cli(main))' in text


@pytest.mark.parametrize("name", PIPELINES)
def test_no_sys_path_insert_in_pipelines(name):
    assert "sys.path.insert" not in (ROOT / "pipelines" / f"{name}.py").read_text()


def test_installed_script_runs_help():
    exe = Path(sys.executable).parent / "anisogen-fit"
    if not exe.exists():
        pytest.skip("console scripts not installed in this environment (pip install -e .)")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: anisogen-fit") and "--texts" in res.stdout


def test_installed_script_reports_user_errors_like_the_pipeline(tmp_path):
    exe = Path(sys.executable).parent / "anisogen-make-toy-corpora"
    if not exe.exists():
        pytest.skip("console scripts not installed in this environment (pip install -e .)")
    (tmp_path / "file").write_text("not a folder")
    res = subprocess.run([str(exe), "--out", str(tmp_path / "file")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")], res.stderr


_HELP_PROBE = """
import contextlib, io, json, sys
from anisogen.commands.{name} import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--help"])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"code": code, "usage": out.getvalue().startswith("usage:"),
                   "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("name", PIPELINES)
def test_help_imports_nothing_heavy(name):
    """``--help`` must answer at once (docs/CLI.md: < 1 s): no torch / open_clip / FAISS before parsing."""
    res = subprocess.run([sys.executable, "-c", _HELP_PROBE.format(name=name, heavy=HEAVY)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    assert got == {"code": 0, "usage": True, "heavy": []}


def test_light_copies_match_the_registries():
    from anisogen.align import ALIGNERS
    from anisogen.commands.defaults import ALIGNER_NAMES

    assert list(ALIGNER_NAMES) == list(ALIGNERS)


def _parse_quietly(fn, argv):
    with contextlib.redirect_stderr(io.StringIO()) as err:
        args = fn(argv)
    return args, err.getvalue()


def test_renamed_embedding_flags_keep_their_old_names():
    from anisogen.commands import analyze, compare_aligners, fit

    new, _ = _parse_quietly(fit.parse_args, ["--aligner", "centroid", "--texts", "t.npy", "--images", "i.npy",
                                             "--out", "o"])
    old, err = _parse_quietly(fit.parse_args, ["--aligner", "centroid", "--text", "t.npy", "--image", "i.npy",
                                               "--out", "o"])
    assert (new.text, new.image) == (old.text, old.image) == (["t.npy"], ["i.npy"])
    assert "--text is deprecated, use --texts" in err and "--image is deprecated, use --images" in err

    old, err = _parse_quietly(compare_aligners.parse_args, ["--fit-text", "a", "--fit-image", "b", "--heldout-text",
                                                            "c", "--heldout-image", "d"])
    new, _ = _parse_quietly(compare_aligners.parse_args, ["--texts", "a", "--images", "b", "--heldout-texts", "c",
                                                          "--heldout-images", "d"])
    for args in (old, new):
        assert (args.fit_text, args.fit_image, args.heldout_text, args.heldout_image) == ("a", "b", "c", "d")
    assert err.count("is deprecated") == 4

    parser = analyze.build_parser()
    old, err = _parse_quietly(parser.parse_args, ["lmar", "--export", "x", "--embeddings", "e.npy", "--texts", "t.txt",
                                                  "--out-dir", "o"])
    assert (old.images, old.captions) == ("e.npy", "t.txt") and err.count("is deprecated") == 2


def test_fit_checks_the_aligner_and_both_inputs_after_parsing(capsys):
    from anisogen.commands import fit

    with pytest.raises(SystemExit) as exc:
        fit.parse_args(["--aligner", "nope", "--texts", "t", "--images", "i", "--out", "o"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        fit.parse_args(["--aligner", "centroid", "--texts", "t", "--out", "o"])
    assert exc.value.code == 2 and "required: --images" in capsys.readouterr().err
