"""``--executor ray`` (local Ray on CPU) produces the same shards as the default executor."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_utils import make_config, manifest_core, shard_bytes, write_corpus, write_images  # noqa: E402

from anisogen.generate import generate  # noqa: E402
from anisogen.shards import verify_folder  # noqa: E402

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'anisogen[ray]'")


def test_ray_executor_matches_default_and_resumes(tmp_path):
    torch.set_num_threads(1)
    write_corpus(tmp_path / "corpus.jsonl", n=160)
    write_images(tmp_path / "img.npy")
    kw = dict(samples_per_shard=40, fit_samples=80)
    generate(make_config(tmp_path, tmp_path / "corpus.jsonl", tmp_path / "img.npy", out="local", **kw))
    cfg = make_config(tmp_path, tmp_path / "corpus.jsonl", tmp_path / "img.npy", out="ray", executor="ray",
                      workers=1, **kw)
    out = tmp_path / "ray"
    # one local Ray instance for both runs (the executor reuses an initialised Ray and its warm worker)
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": root, "HF_HUB_OFFLINE": "1"}})
    try:
        s = generate(cfg)
        assert s["status"] == "complete" and s["this_run"]["shards"] == 4
        assert shard_bytes(out) == shard_bytes(tmp_path / "local")
        assert manifest_core(out) == manifest_core(tmp_path / "local")
        assert verify_folder(out)["shards"] == 4
        # resume: only the missing shards become Ray tasks
        for name in ("shard-000001.tar", "shard-000003.tar"):
            (out / name).unlink()
        s = generate(cfg)
        assert s["this_run"]["shards"] == 2 and shard_bytes(out) == shard_bytes(tmp_path / "local")
        assert ray.is_initialized()  # an instance the caller started is left running
    finally:
        ray.shutdown()
