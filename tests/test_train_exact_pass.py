"""Stage 1 exact-pass sampling: coverage across ranks x workers, determinism, mid-epoch resume, bad shards,
and the on-demand stage-2 embedding store."""

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from anisogen.train.data import (
    EmbeddingStore, EmbeddingTransform, ExactPlan, ExampleBuilder, RejectLog, SampleError, StreamSpec,
    exact_pipeline, list_shards, make_loader, read_sizes, shard_sizes,
)
from anisogen.train.data.shard_stream import _count_tar_samples
from anisogen.train.synthetic import make_items, write_caption_shards
from anisogen.train.templates import get_template
from anisogen.train.tiny import build_tiny_tokenizer

torch.set_num_threads(1)
D = 16
BS = 4


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def builder(tok, noise=0.0):
    return ExampleBuilder(tok, get_template("plain"), EmbeddingTransform(True, noise), 6, 1, D, 1, 128)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    items = make_items(75, d=D, seed=1)
    write_caption_shards(d, items, samples_per_shard=10)  # 7 shards of 10 + one of 5: uneven
    return d, items


def _plan(d, seed=0, world=2, log=None):
    spec = StreamSpec.from_shards(d, log=log)
    return spec, ExactPlan.build(spec.shards, spec.extra["sizes"], seed=seed, batch_size=BS, world_size=world, log=log)


def _rank_keys(spec, plan, tok, rank, epoch, workers, start=0, noise=0.0):
    pipe = exact_pipeline(spec, builder(tok, noise), plan, rank=rank, epoch=epoch, start=start)
    batches = list(make_loader(pipe, workers))
    return batches, [k for b in batches for k in b["keys"]]


def test_exact_pass_covers_every_key_once_across_ranks_and_workers(shards, tok):
    d, items = shards
    spec, plan = _plan(d)
    assert plan.num_samples == 75 and plan.batches_per_rank == 9  # 75 // (4 * 2)
    assert plan.samples_per_epoch == 72 and plan.dropped_per_epoch == 3
    assert [len(plan.rank_keys(0, r)) for r in (0, 1)] == [36, 36]
    assert len(set(plan.rank_keys(0, 0)) | set(plan.rank_keys(0, 1))) == 72
    per_epoch = []
    for epoch in (0, 1):
        keys, counts = [], []
        for rank in (0, 1):
            batches, k = _rank_keys(spec, plan, tok, rank, epoch, workers=2)
            assert len(batches) == plan.batches_per_rank and all(len(b["keys"]) == BS for b in batches)
            _, k0 = _rank_keys(spec, plan, tok, rank, epoch, workers=0)
            assert k == k0  # the order does not depend on the number of workers
            keys += k
            counts.append(len(batches))
        assert counts[0] == counts[1]
        assert len(keys) == len(set(keys)) == 72  # each key at most once, 3 dropped (counted by the plan)
        assert set(keys) <= {it["key"] for it in items}
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1] and set(per_epoch[0]) != set(per_epoch[1])  # dropped tail differs too
    _, again = _rank_keys(spec, plan, tok, 0, 0, workers=1)
    assert again == per_epoch[0][:36]  # same seed, same epoch: same order
    _, plan7 = _plan(d, seed=7)
    _, other = _rank_keys(spec, plan7, tok, 0, 0, workers=0)
    assert other != again


def test_exact_pass_no_drop_when_divisible(tmp_path, tok):
    items = make_items(24, d=D, seed=2)
    write_caption_shards(tmp_path, items, samples_per_shard=5)  # 5,5,5,5,4
    spec, plan = _plan(tmp_path)
    assert plan.dropped_per_epoch == 0
    keys = [k for r in (0, 1) for k in _rank_keys(spec, plan, tok, r, 0, workers=2)[1]]
    assert sorted(keys) == sorted(it["key"] for it in items)


def test_mid_epoch_resume_equals_uninterrupted_run(shards, tok):
    d, _ = shards
    spec, plan = _plan(d)
    full, keys = _rank_keys(spec, plan, tok, 1, 3, workers=2, noise=0.1)
    for start in (1, 4, 7):
        for workers in (0, 2):  # a resume may use another number of workers
            resumed, rkeys = _rank_keys(spec, plan, tok, 1, 3, workers=workers, start=start, noise=0.1)
            assert rkeys == keys[start * BS:]
            assert all(torch.equal(a["emb"], b["emb"]) for a, b in zip(full[start:], resumed))  # same noise draws
    assert _rank_keys(spec, plan, tok, 1, 3, workers=0, start=plan.batches_per_rank)[1] == []


def _copy_shards(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())


def test_missing_shard_is_named_or_rejected(shards, tmp_path, tok):
    d, _ = shards
    _copy_shards(d, tmp_path / "s")
    gone = tmp_path / "s" / "shard-000002.tar"
    gone.unlink()
    with pytest.raises(SampleError, match=r"missing shard file .*shard-000002\.tar"):
        StreamSpec.from_shards(tmp_path / "s")
    with pytest.raises(SampleError, match=r"missing shard file .*shard-000002\.tar"):
        read_sizes(list_shards(tmp_path / "s"))
    log = RejectLog("skip", str(tmp_path / "rej"), tag="load")
    spec, plan = _plan(tmp_path / "s", log=log)
    assert log.total == 1 and str(gone) not in spec.shards and plan.num_samples == 65
    (line,) = [json.loads(x) for f in (tmp_path / "rej").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert line["source"] == str(gone) and "missing" in line["reason"] and str(gone) in line["reason"]
    keys = [k for r in (0, 1) for k in _rank_keys(spec, plan, tok, r, 0, workers=0)[1]]
    assert len(keys) == len(set(keys)) == 64


def test_missing_shard_at_read_time_names_the_file(tmp_path):
    log = RejectLog("skip", str(tmp_path / "rej"))
    url = str(tmp_path / "shard-000009.tar")
    from anisogen.train.data import shard_samples

    assert list(shard_samples([{"url": url}], log)) == []
    (line,) = [json.loads(x) for f in (tmp_path / "rej").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert line["reason"] == f"missing shard file {url}"
    with pytest.raises(SampleError, match=r"missing shard file .*shard-000009\.tar"):
        list(shard_samples([{"url": url}], RejectLog("fail")))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_or_non_tar_is_never_a_silent_zero(shards, tmp_path, tok):
    d, _ = shards
    _copy_shards(d, tmp_path / "s")
    (tmp_path / "s" / "sizes.json").unlink()  # sizes must be counted from the tars
    (tmp_path / "s" / "manifest.json").unlink()
    bad = tmp_path / "s" / "shard-000001.tar"
    _truncate(bad, 3000)
    junk = tmp_path / "s" / "shard-000003.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(SampleError, match=r"shard-000001\.tar.*truncated"):
        _count_tar_samples(str(bad))
    with pytest.raises(SampleError, match=r"shard-000003\.tar"):
        read_sizes([str(junk)])
    log = RejectLog("skip")
    sizes = shard_sizes(list_shards(tmp_path / "s"), log)
    assert str(bad) not in sizes and str(junk) not in sizes and log.total == 2 and sum(sizes.values()) == 55


def _run_epoch(spec, plan, tok, rejects_dir=None):
    out = []
    for r in range(plan.world_size):
        pipe = exact_pipeline(spec, builder(tok), plan, rank=r, epoch=0, rejects_dir=rejects_dir)
        out += list(make_loader(pipe, 0))
    return out


def test_truncated_shard_with_listed_size_is_rejected_in_exact_pass(shards, tmp_path, tok):
    d, _ = shards
    _copy_shards(d, tmp_path / "s")  # sizes.json still says 10 for the truncated shard
    bad = tmp_path / "s" / "shard-000001.tar"
    with tarfile.open(bad) as tf:
        members = tf.getmembers()
    assert len(members) == 30  # txt + emb.npy + json per sample
    _truncate(bad, members[24].offset_data)  # the last 2 samples (at least) are gone
    (tmp_path / "s" / "shard-000003.tar").write_bytes(b"junk" * 200)  # not a tar: rejected at plan time
    log = RejectLog("skip")
    spec, plan = _plan(tmp_path / "s", log=log)
    assert log.total == 1 and plan.num_samples == 65 and plan.samples_per_epoch == 64
    rej = tmp_path / "rej"
    batches = _run_epoch(spec, plan, tok, str(rej))
    assert len(batches) == 2 * plan.batches_per_rank  # every rank still gets its batches
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) and 64 - 3 <= len(keys) <= 64 - 2
    assert sum(b["n_rejected"] for b in batches) >= 2
    reasons = [json.loads(x) for f in rej.glob("*.jsonl") for x in f.read_text().splitlines()]
    assert any(x["source"] == str(bad) and "fewer samples than its size" in x["reason"] for x in reasons)
    with pytest.raises(SampleError, match="shard-000003.tar"):
        _plan(tmp_path / "s", log=RejectLog("fail"))
    # a shard that loses a whole batch's worth of samples stops the run with an error naming it
    _truncate(bad, members[3].offset_data)
    with pytest.raises(SampleError, match=r"all 4 samples were rejected .*shard-000001\.tar"):
        _run_epoch(spec, plan, tok)


def test_stage2_store_reads_embeddings_on_demand(shards, tmp_path):
    d, items = shards
    store = EmbeddingStore(None, list_shards(d))
    assert store.shape == (1, D) and store.shard_rejects == 0
    assert not hasattr(store, "_table") or store._table is None  # no array of every embedding in RAM
    ref = items[13]
    emb = store.get(ref["key"])
    assert emb.dtype == np.float32 and emb.shape == (1, D)
    assert np.allclose(emb[0] / np.linalg.norm(emb[0]), ref["emb"] / np.linalg.norm(ref["emb"]), atol=2e-3)
    with pytest.raises(SampleError, match="missing embedding key"):
        store.get("nope")
    import pickle

    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers get a copy
    assert np.array_equal(clone.get(ref["key"]), emb)


def test_trainer_exact_pass_resume_equals_uninterrupted(tmp_path):
    from anisogen.train import TrainConfig, train
    from anisogen.train.checkpoint import read_state

    items = make_items(30, d=D, seed=3)
    write_caption_shards(tmp_path / "data", items, samples_per_shard=8)  # 8,8,8,6
    kw = dict(train_shards=[str(tmp_path / "data")], batch_size=4, lr=1e-2, warmup_ratio=0.0, num_workers=1,
              progress=False, log_every=1, projector="expand2", max_length=96, max_steps=10, noise_std=0.05,
              deterministic=True, stage1_sampling="exact", report_to="none")
    a = train(TrainConfig(output_dir=str(tmp_path / "a"), **kw))
    assert a["batches_per_epoch"] == 7 and a["exact_plan"]["dropped_per_epoch"] == 2  # 30 // 4; 2 dropped, counted
    halted = train(TrainConfig(output_dir=str(tmp_path / "b"), halt_at_step=4, **kw))
    assert halted["halted"]
    state = read_state(tmp_path / "b" / "checkpoints" / "step-00000004")
    assert state["data"]["sampling"] == "exact"
    assert state["data"]["exact"]["epoch"] == 0 and state["data"]["exact"]["batch_cursor"] == 4
    resumed = train(TrainConfig(output_dir=str(tmp_path / "b"), **kw))  # crosses into epoch 1 at step 8
    assert resumed["start_step"] == 4 and resumed["batches_per_rank"] == [6]
    assert a["losses"][4:] == resumed["losses"]
    with pytest.raises(ValueError, match="different config.*stage1_sampling"):
        train(TrainConfig(output_dir=str(tmp_path / "b"), **dict(kw, stage1_sampling="resampled")))


def test_two_process_ddp_exact_pass_uneven_shards(tmp_path):
    """Real 2-process DDP (gloo, accelerate launch) with shards of 31, 7 and 19 samples: equal batches,
    the dropped remainder reported."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    items = make_items(57, d=D, seed=0)
    folder = tmp_path / "train"
    folder.mkdir()
    start = 0
    for i, n in enumerate((31, 7, 19)):
        write_caption_shards(tmp_path / f"tmp{i}", items[start:start + n], samples_per_shard=n)
        (tmp_path / f"tmp{i}" / "shard-000000.tar").rename(folder / f"shard-{i:06d}.tar")
        start += n
    (folder / "sizes.json").write_text(
        json.dumps({"shard-000000.tar": 31, "shard-000001.tar": 7, "shard-000002.tar": 19})
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(root / "pipelines" / "train.py"), "--train-shards", str(folder), "--output-dir", str(out),
           "--lm", "tiny", "--max-steps", "4", "--batch-size", "4", "--grad-accum", "2", "--num-workers", "2",
           "--no-progress", "--projector", "linear", "--stage1-sampling", "exact", "--report-to", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["batches_per_rank"] == [8, 8]  # 4 steps x 2 micro-batches, crossing one epoch boundary
    assert summary["batches_per_epoch"] == 7  # 57 // (4 * 2)
    assert summary["exact_plan"]["dropped_per_epoch"] == 1 and summary["stage1_sampling"] == "exact"
    assert "1 dropped per epoch" in proc.stdout
