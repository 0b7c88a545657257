"""Data: resampled training streams, exact eval passes, stage-2 records, bad inputs."""

import json

import numpy as np
import pytest
import torch

from anisogen.train.data import (
    EmbeddingStore, EmbeddingTransform, ExampleBuilder, RejectLog, SampleError, StreamSpec, decode_embedding,
    epoch_batches, eval_batches, list_shards, make_loader, probe_embedding_shape, read_provenance, read_sizes,
    train_pipeline,
)
from anisogen.train.synthetic import make_items, write_caption_shards, write_conversations, write_npy
from anisogen.train.templates import get_template
from anisogen.train.tiny import build_tiny_tokenizer

torch.set_num_threads(1)
D = 16


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def builder(tok, template="plain", max_length=128, noise=0.0):
    return ExampleBuilder(tok, get_template(template), EmbeddingTransform(True, noise), 6, 1, D, 1, max_length)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    items = make_items(100, d=D, seed=0)
    write_caption_shards(d, items, samples_per_shard=10)
    return d, items


def test_incomplete_generator_run_is_refused(tmp_path):
    from anisogen.shards import IncompleteRunError

    write_caption_shards(tmp_path, make_items(4, d=D), samples_per_shard=2)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["status"] = "running"
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(IncompleteRunError, match="not complete"):
        list_shards(tmp_path)


def test_listing_sizes_provenance(shards):
    d, items = shards
    urls = list_shards(d)
    assert len(urls) == 10 and urls == sorted(urls)
    assert read_sizes(urls) == 100
    assert probe_embedding_shape(urls) == (1, D)
    assert read_provenance(d) == {"clip_fingerprint": "synthetic", "aligner": {"name": "none", "fingerprint": None}}
    with pytest.raises(FileNotFoundError, match="no shards found"):
        list_shards(d / "nope")


def _count(spec, tok, workers, rank, world, monkeypatch, epoch=0, seed=0, bs=4):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    nb, per_worker = epoch_batches(spec.num_samples, bs, world, workers)
    pipe = train_pipeline(spec, builder(tok), batch_size=bs, num_worker_batches=per_worker, seed=seed, epoch=epoch,
                          shuffle_buffer=20)
    batches = list(make_loader(pipe, workers))
    return nb, batches


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_stream_equal_batches_per_rank(shards, tok, workers, monkeypatch):
    spec = StreamSpec.from_shards(shards[0])
    seen = []
    for rank in (0, 1):
        nb, batches = _count(spec, tok, workers, rank, 2, monkeypatch)
        assert nb == (13 if workers == 0 else 14)  # ceil(100 / (4*2)) = 13, rounded up to a multiple of 2 workers
        assert len(batches) == nb
        assert all(b["input_ids"].shape[0] == 4 for b in batches)  # full batches only
        assert all(b["has_image"].dtype == torch.bool and b["has_image"].all() for b in batches)  # stage 1: all images
        seen.append([k for b in batches for k in b["keys"]])
    assert seen[0] != seen[1]  # ranks read differently seeded streams


def test_stream_is_deterministic_per_epoch(shards, tok, monkeypatch):
    spec = StreamSpec.from_shards(shards[0])
    _, a = _count(spec, tok, 0, 0, 1, monkeypatch, epoch=3)
    _, b = _count(spec, tok, 0, 0, 1, monkeypatch, epoch=3)
    _, c = _count(spec, tok, 0, 0, 1, monkeypatch, epoch=4)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["emb"], y["emb"]) for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


def test_eval_pass_covers_every_key_once(shards, tok):
    d, items = shards
    spec = StreamSpec.from_shards(d)
    for world in (1, 2, 3, 16):  # 16 ranks > 10 shards: sample-level split
        batches = [
            b for r in range(world) for b in eval_batches(spec, builder(tok), batch_size=7, rank=r, world_size=world)
        ]
        keys = [k for b in batches for k in b["keys"]]
        assert sorted(keys) == sorted(it["key"] for it in items), world
        assert all(torch.equal(b["has_image"], torch.ones(len(b["keys"]), dtype=torch.bool)) for b in batches)


def test_embedding_transform_and_decode():
    x = np.array([[3.0, 4.0]], np.float32)
    t = EmbeddingTransform(True, 0.0)
    assert np.allclose(t(x, train=True), [[0.6, 0.8]])
    noisy = EmbeddingTransform(True, 0.5)
    a = noisy(x, train=True, rng=np.random.default_rng(0))
    assert np.isclose(np.linalg.norm(a), 1.0) and not np.allclose(a, [[0.6, 0.8]])
    assert np.allclose(noisy(x, train=False), [[0.6, 0.8]])  # eval: same normalisation, no noise
    bf16_bits = (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(decode_embedding(bf16_bits, name="x"), [[1.5, -2.0]])
    with pytest.raises(SampleError, match="NaN"):
        decode_embedding(np.array([np.nan, 1.0], np.float32), name="x")
    with pytest.raises(SampleError, match="unreadable"):
        decode_embedding(b"not an npy", name="x")


def _bad_shards(tmp_path, corrupt=True):
    items = make_items(50, d=D, seed=5)
    items[3]["drop_emb.npy"] = True  # missing embedding key
    items[7]["emb"] = np.ones(D + 4, np.float32) / np.sqrt(D + 4)  # wrong dimension
    items[11]["caption"] = "z" * 400  # over-long: the tail is cut
    write_caption_shards(tmp_path, items, samples_per_shard=10)
    if corrupt:  # a shard listed in the manifest whose bytes were damaged after publication
        (tmp_path / "shard-000004.tar").write_bytes(b"\x00garbage" * 300)
    return items


def test_bad_records_are_skipped_counted_and_written(tmp_path, tok):
    _bad_shards(tmp_path / "s")
    spec = StreamSpec.from_shards(tmp_path / "s")
    rej = tmp_path / "rejects"
    batches = list(eval_batches(spec, builder(tok, max_length=64), batch_size=8, rejects_dir=str(rej)))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 40 - 2  # corrupt shard contributed nothing; two bad records skipped
    assert sum(b["n_rejected"] for b in batches) == 3  # missing key, wrong dim, corrupt shard
    assert sum(b["n_truncated"] for b in batches) == 1
    lines = [json.loads(x) for f in rej.glob("*.jsonl") for x in f.read_text().splitlines()]
    reasons = " | ".join(x["reason"] for x in lines)
    assert "missing field 'emb.npy'" in reasons
    assert "does not match the projector input" in reasons
    assert "corrupt or unreadable shard" in reasons and any(x["source"].endswith("shard-000004.tar") for x in lines)
    for b in batches:  # truncated rows keep every placeholder and stay within max_length
        assert b["input_ids"].shape[1] <= 64 and ((b["input_ids"] == 6).sum(1) == 1).all()


def test_bad_records_in_training_stream(tmp_path, tok, monkeypatch):
    _bad_shards(tmp_path / "s")
    spec = StreamSpec.from_shards(tmp_path / "s")
    nb, batches = _count(spec, tok, 0, 0, 1, monkeypatch, bs=4)
    assert len(batches) == nb == 13  # sizes.json counts 5 shards x 10
    assert sum(b["n_rejected"] for b in batches) >= 1


def test_fail_mode_names_the_record_or_shard(tmp_path, tok):
    _bad_shards(tmp_path / "s", corrupt=False)
    spec = StreamSpec.from_shards(tmp_path / "s")
    with pytest.raises(SampleError, match=r"record 's000000-000003' in .*shard-000000.tar: missing field 'emb.npy'"):
        list(eval_batches(spec, builder(tok), batch_size=8, on_error="fail"))
    _bad_shards(tmp_path / "c")
    spec = StreamSpec.from_shards(tmp_path / "c")
    spec.shards = [u for u in spec.shards if u.endswith("000004.tar")]
    with pytest.raises(SampleError, match=r"corrupt or unreadable shard .*shard-000004.tar"):
        list(eval_batches(spec, builder(tok), batch_size=8, on_error="fail"))


def test_all_shards_corrupt_fails_instead_of_spinning(tmp_path, tok, monkeypatch):
    (tmp_path / "s").mkdir()
    for i in range(2):
        (tmp_path / "s" / f"shard-00000{i}.tar").write_bytes(b"junk" * 100)
    spec = StreamSpec(shards=list_shards(tmp_path / "s"), num_samples=8)
    with pytest.raises(SampleError, match="all 2 shards are corrupt"):
        _count(spec, tok, 0, 0, 1, monkeypatch)


def test_stage2_records_by_index_and_key(tmp_path, tok, shards):
    d, items = shards
    write_npy(tmp_path / "emb.npy", items)
    write_conversations(tmp_path / "idx.jsonl", items[:20], ref="index")
    write_conversations(tmp_path / "key.jsonl", items[:20], ref="key")
    with open(tmp_path / "idx.jsonl", "a") as f:
        f.write(json.dumps({"id": "oob", "image": 999, "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
        f.write("{not json\n")
    with open(tmp_path / "key.jsonl", "a") as f:
        f.write(json.dumps({"id": "missing", "image": "no-such-key", "conversations": [
            {"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
    store = EmbeddingStore(str(tmp_path / "emb.npy"), list_shards(d))
    log = RejectLog("skip", str(tmp_path / "rej"), tag="load")
    a = StreamSpec.from_jsonl(str(tmp_path / "idx.jsonl"), store, log)
    b = StreamSpec.from_jsonl(str(tmp_path / "key.jsonl"), store, log)
    assert a.num_samples == b.num_samples == 20 and log.total == 3
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "rej").glob("*.jsonl").__next__().read_text().splitlines()]
    assert any("out of range" in r for r in reasons) and any("invalid JSON" in r for r in reasons)
    assert any("missing embedding key 'no-such-key'" in r for r in reasons)
    assert a.extra["text_only"] == b.extra["text_only"] == 0
    bl = builder(tok, template="vicuna_v1", max_length=512)
    assert all(bt["has_image"].all() for bt in eval_batches(a, bl, batch_size=5))
    ea = [x for bt in eval_batches(a, bl, batch_size=5) for x in bt["emb"]]
    eb = [x for bt in eval_batches(b, bl, batch_size=5) for x in bt["emb"]]
    # shards store float16, the .npy float32: the same embeddings up to fp16 rounding
    assert all(torch.allclose(x, y, atol=2e-3) for x, y in zip(ea, eb))
    assert len(ea) == 20
    with pytest.raises(SampleError, match="missing embedding key"):
        StreamSpec.from_jsonl(str(tmp_path / "key.jsonl"), store, RejectLog("fail"))
