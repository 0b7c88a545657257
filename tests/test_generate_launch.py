"""The real CLI under ``accelerate launch`` (2 CPU processes): same bytes as one process; SIGKILL of the
whole launched job group, then relaunch, finishes exactly once (slow)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_utils import make_config, manifest_core, shard_bytes, write_corpus, write_images  # noqa: E402

from anisogen.generate import generate  # noqa: E402
from anisogen.shards import iter_samples, verify_folder  # noqa: E402
from anisogen.shards.schema import make_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SPS = 20


def _launch_cmd(tmp: Path, out: str) -> list[str]:
    accelerate = VENV_BIN / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            str(ROOT / "pipelines" / "generate.py"), "--corpus", str(tmp / "corpus.jsonl"), "--id-field", "id",
            "--model", "toy", "--pretrained", "random", "--out", str(tmp / out), "--samples-per-shard", str(SPS),
            "--aligner", "centroid", "--images", str(tmp / "img.npy"), "--fit-samples", "120", "--batch-size", "16",
            "--workers", "0", "--threads", "1", "--cache-dir", str(tmp / "hf-cache"), "--no-progress"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    expected = write_corpus(tmp / "corpus.jsonl")
    write_images(tmp / "img.npy")
    torch.set_num_threads(1)
    generate(make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="ref", samples_per_shard=SPS))
    return tmp, expected


def test_accelerate_launch_two_processes_equals_one(ref):
    tmp, _ = ref
    res = subprocess.run(_launch_cmd(tmp, "launched"), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert shard_bytes(tmp / "launched") == shard_bytes(tmp / "ref")
    assert manifest_core(tmp / "launched") == manifest_core(tmp / "ref")


@pytest.mark.slow
def test_sigkill_launched_group_then_relaunch(ref):
    tmp, expected = ref
    out = tmp / "killed"
    # a rank SIGKILLs itself after publishing a tar, before its record: torchrun tears the group down
    res = subprocess.run(_launch_cmd(tmp, "killed"), env=_env(ANISOGEN_FAULT="after_rename:1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    done = len(list((out / "records").glob("shard-*.json")))
    assert done < 12
    # SIGKILL of the whole job (launcher and both ranks) from outside, mid-run
    proc = subprocess.Popen(_launch_cmd(tmp, "killed"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "records").glob("shard-*.json"))) >= done + 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((out / "records").glob("shard-*.json"))) < 12
    res = subprocess.run(_launch_cmd(tmp, "killed"), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert verify_folder(out)["samples"] == 240 - len(expected)
    keys = [s["key"] for s in iter_samples(out)]
    assert keys == [make_key(r // SPS, r % SPS) for r in range(240) if r not in expected]
    assert shard_bytes(out) == shard_bytes(tmp / "ref")
