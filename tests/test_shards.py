"""Shard format: keys, storage dtypes, atomic publish, completion records, manifest, readers."""

import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from anisogen.shards import reader, schema, writer


def _samples(task, n, d=8, seed=0, dtype="fp16", src=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(n):
        meta = {"id": f"doc-{i}", "row": 100 * task + i, "n_tokens": 5 + i, "truncated": i == 1,
                "model": "toy|random|sha256=0", "aligner": "identity"}
        out.append(schema.sample_members(schema.make_key(task, i), f"text {i} — ünïcode",
                                         schema.encode_embedding(x[i], dtype),
                                         meta, schema.encode_embedding(x[i], dtype) if src else None))
    return out, x


def _publish(d, task, n, **kw):
    samples, x = _samples(task, n, **kw)
    entry = writer.write_shard(d, task, samples)
    writer.write_record(d, {**entry, "rows": [100 * task, 100 * task + n], "rejects": 0, "reject_reasons": {},
                            "reject_list": [], "stats": {"encode_s": 1.0}})
    return entry, x


def test_keys_roundtrip_and_have_no_dots():
    key = schema.make_key(12, 345)
    assert key == "s000012-000345" and "." not in key
    assert schema.parse_key(key) == (12, 345)
    assert schema.shard_name(7) == "shard-000007.tar" and schema.shard_task("/x/shard-000007.tar") == 7
    keys = [schema.make_key(t, r) for t in range(3) for r in range(0, 1200, 97)]
    assert keys == sorted(keys)
    for bad in ("s12-3", "s000012.000345", "x000001-000002"):
        with pytest.raises(ValueError):
            schema.parse_key(bad)
    with pytest.raises(ValueError):
        schema.shard_task("shard-1.tar")


def test_storage_dtypes_roundtrip():
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    bits = schema.encode_embedding(x, "bf16")
    assert bits.dtype == np.uint16
    expect = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # torch rounds to nearest even
    np.testing.assert_array_equal(schema.decode_embedding(bits), expect)
    assert schema.dtype_name(bits) == "bf16"
    f16 = schema.encode_embedding(x, "fp16")
    np.testing.assert_array_equal(schema.decode_embedding(f16), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(schema.decode_embedding(schema.encode_embedding(x, "fp32")), x)
    with pytest.raises(ValueError):
        schema.encode_embedding(x, "int8")
    with pytest.raises(ValueError):
        schema.decode_embedding(np.zeros(3, dtype=np.int32))


def test_write_shard_is_byte_reproducible_and_readable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ea, x = _publish(a, 3, 6, src=True)
    eb, _ = _publish(b, 3, 6, src=True)
    assert (
        ea == eb and ea["nsamples"] == 6 and ea["key_first"] == "s000003-000000" and ea["key_last"] == "s000003-000005"
    )
    assert (a / "shard-000003.tar").read_bytes() == (b / "shard-000003.tar").read_bytes()
    assert writer.file_sha256(a / "shard-000003.tar") == ea["sha256"]
    with tarfile.open(a / "shard-000003.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members[:4]] == ["s000003-000000.emb.npy", "s000003-000000.json",
                                           "s000003-000000.src.npy", "s000003-000000.txt"]
    assert all(m.mtime == 0 and m.uname == "anisogen" and m.mode == 0o444 for m in members)
    got = list(reader.iter_samples(a / "shard-000003.tar"))
    assert [s["key"] for s in got] == [schema.make_key(3, i) for i in range(6)]
    np.testing.assert_allclose(np.stack([s["emb"] for s in got]), x, atol=1e-3)
    assert got[1]["meta"]["truncated"] is True and got[0]["text"] == "text 0 — ünïcode"


def test_failed_write_leaves_no_shard_and_no_temp(tmp_path):
    samples, _ = _samples(0, 4)

    def broken():
        yield samples[0]
        yield samples[1]
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError):
        writer.write_shard(tmp_path, 0, broken())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="increase"):
        writer.write_shard(tmp_path, 0, [samples[1], samples[0]])
    assert list(tmp_path.iterdir()) == []


def test_check_published_detects_missing_and_corrupt(tmp_path):
    _publish(tmp_path, 0, 3)
    _publish(tmp_path, 1, 3)
    _publish(tmp_path, 2, 3)
    assert writer.check_published(tmp_path, 0) is not None
    # corrupt shard 1 with the same size: caught by sha256 only
    p = tmp_path / "shard-000001.tar"
    data = bytearray(p.read_bytes())
    data[600] ^= 0xFF
    p.write_bytes(bytes(data))
    assert writer.check_published(tmp_path, 1, verify="size", remove_invalid=False) is not None
    assert writer.check_published(tmp_path, 1) is None
    assert not p.exists() and writer.read_record(tmp_path, 1) is None  # both removed: task will be redone
    (tmp_path / "shard-000002.tar").unlink()
    assert writer.check_published(tmp_path, 2) is None and writer.read_record(tmp_path, 2) is None
    # a tar without record is not published
    samples, _ = _samples(5, 2)
    writer.write_shard(tmp_path, 5, samples)
    assert writer.check_published(tmp_path, 5) is None


def test_remove_temps_scoped_to_task(tmp_path):
    (tmp_path / "records").mkdir()
    t0 = tmp_path / "shard-000000.tar.11-aa.tmp"
    t1 = tmp_path / "shard-000001.tar.12-bb.tmp"
    r1 = tmp_path / "records" / "shard-000001.json.12-cc.tmp"
    for p in (t0, t1, r1):
        p.write_bytes(b"partial")
    assert sorted(p.name for p in writer.remove_temps(tmp_path, 1)) == sorted([t1.name, r1.name])
    assert t0.exists()
    writer.remove_temps(tmp_path)
    assert not t0.exists()


def test_manifest_sizes_rejects_and_verify(tmp_path):
    _publish(tmp_path, 1, 4)
    _publish(tmp_path, 0, 3)
    recs = writer.list_records(tmp_path)
    recs[1]["reject_list"] = [{"row": 104, "task": 1, "id": None, "reason": "empty", "detail": "blank line"}]
    recs[1]["rejects"] = 1
    recs[1]["reject_reasons"] = {"empty": 1}
    header = {"dim": 8, "num_tasks": 2, "config": {"a": 1}, "config_fingerprint": schema.fingerprint({"a": 1})}
    with pytest.raises(reader.IncompleteRunError):
        writer.assemble(tmp_path, header, recs, complete=False)
        reader.load_manifest(tmp_path)
    m = writer.assemble(tmp_path, header, recs, complete=True)
    assert [e["task"] for e in m["shards"]] == [0, 1]
    assert all("reject_list" not in e for e in m["shards"])
    assert m["totals"]["samples"] == 7 and m["totals"]["rejects"] == 1 and m["totals"]["input_rows"] == 7
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 4}
    assert reader.read_rejects(tmp_path) == recs[1]["reject_list"]
    assert reader.verify_folder(tmp_path) == {"shards": 2, "samples": 7, "keys": 7}
    arr, keys, texts = reader.read_embeddings(tmp_path, with_keys=True, with_text=True)
    assert (
        arr.shape == (7, 8) and arr.dtype == np.float32 and keys[0] == "s000000-000000" and keys[3] == "s000001-000000"
    )
    assert reader.read_embeddings(tmp_path, limit=2).shape == (2, 8)
    with pytest.raises(ValueError, match="src"):
        reader.read_embeddings(tmp_path, field="src")
    # plain webdataset and the tar CLI read the shards
    ds = wds.WebDataset(reader.shard_urls(tmp_path), shardshuffle=False).map(reader.decode_wds_sample)
    wkeys = [s["key"] for s in ds]
    assert wkeys == keys
    listing = subprocess.run(
        ["tar", "tf", str(tmp_path / "shard-000001.tar")], capture_output=True, text=True, check=True
    )
    assert listing.stdout.split()[:3] == ["s000001-000000.emb.npy", "s000001-000000.json", "s000001-000000.txt"]
    # verify notices a manifest/shard disagreement
    m["shards"][0]["nsamples"] = 2
    writer.atomic_write_json(tmp_path / "manifest.json", m)
    with pytest.raises(ValueError):
        reader.verify_folder(tmp_path)


def test_sample_members_validation():
    meta = {"id": "x", "row": 0, "n_tokens": 2, "truncated": False, "model": "m", "aligner": "a"}
    emb = np.zeros(4, np.float16)
    with pytest.raises(ValueError, match="dot"):
        schema.sample_members("a.b", "t", emb, meta)
    with pytest.raises(ValueError, match="metadata"):
        schema.sample_members("ab", "t", emb, {**meta, "extra": 1})
    s = schema.sample_members("ab", "t", emb, meta)
    assert json.loads(s["json"]) == meta and schema.npy_load(s["emb.npy"]).dtype == np.float16
