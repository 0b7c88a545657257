"""2-process DDP on CPU (gloo) through `accelerate launch`: equal batch counts, no hang."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from anisogen.train.synthetic import make_items, write_caption_shards

ROOT = Path(__file__).resolve().parents[1]


def _uneven_shards(folder: Path, sizes, seed):
    items = make_items(sum(sizes), d=16, seed=seed)
    folder.mkdir(parents=True)
    start = 0
    for i, n in enumerate(sizes):  # one shard per size, so ranks get unequal sample counts
        write_caption_shards(folder / f"tmp{i}", items[start:start + n], samples_per_shard=n)
        (folder / f"tmp{i}" / "shard-000000.tar").rename(folder / f"shard-{i:06d}.tar")
        start += n
    (folder / "sizes.json").write_text(json.dumps({f"shard-{i:06d}.tar": n for i, n in enumerate(sizes)}))
    for i in range(len(sizes)):
        shutil.rmtree(folder / f"tmp{i}")


def test_two_process_ddp_equal_batches_no_hang(tmp_path):
    _uneven_shards(tmp_path / "train", [31, 7, 19], seed=0)
    _uneven_shards(tmp_path / "val", [9, 2, 5], seed=1)  # eval: ranks get 14 vs 2 samples
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "pipelines" / "train.py"), "--train-shards", str(tmp_path / "train"),
           "--val-shards", str(tmp_path / "val"), "--output-dir", str(out), "--lm", "tiny", "--max-steps", "4",
           "--batch-size", "4", "--grad-accum", "2", "--num-workers", "1", "--eval-every", "2",
           "--eval-max-batches", "0", "--log-generations", "2", "--no-progress", "--projector", "linear"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["batches_per_rank"] == [8, 8]  # 4 steps x 2 micro-batches on every rank
    assert summary["batches_per_epoch"] == 8  # ceil(57 / (4 * 2)) = 8, a multiple of 1 worker
    evals = summary["evals"]
    assert [e["step"] for e in evals] == [2, 4]
    # the validation pass covered every held-out sample exactly once across both ranks: byte-level
    # tokenizer, so each caption contributes len(utf-8 bytes) + 1 (EOS) target tokens
    val_items = make_items(16, d=16, seed=1)
    expected = sum(len(it["caption"].encode()) + 1 for it in val_items)
    assert all(e["val_tokens"] == expected for e in evals)
    assert (out / "export" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000004").glob("rng-rank*.safetensors")) == [
        "rng-rank0.safetensors", "rng-rank1.safetensors"]
