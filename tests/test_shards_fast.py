"""The columnar shard writer (``writer.write_task_shard``): byte identity with ``write_shard`` over
``sample_members`` dicts and with ``webdataset.TarWriter``, validation, events and atomic publish."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from anisogen.shards import reader, schema, writer

MODEL = "ViT-B-32|openai|sha256=0123abcd"
ALIGNER = "centroid"

NASTY_TEXTS = [
    "a photo of a cat", "", "emoji 🐈‍⬛🚀 and CJK 猫の写真 한국어", "combining e\u0301 a\u0308 ﬁ", "NUL\x00inside\x00",
    "trailing NUL\x00", "new\nlines\r\n\tand tabs", "quotes \" and \\ backslashes", "x" * 511, "y" * 512, "z" * 513,
    "ü" * 700, "long " * 1200,  # > _WIDE_BLOCKS blocks: copied on its own
]
NASTY_IDS = [
    "doc-0", "", 'say "hi"', "back\\slash", "ctrl\x01\x1f\x7f", "tab\tnew\nline", "ünïcode 猫 🐈", "\u2028\u2029",
    "/slash", "a%sb%d{}", "x" * 300, "0", "nul\x00",
]


def _columns(n, *, d=8, dtype="fp16", src=False, seed=0, texts=None, ids=None, start=0, step=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = rng.standard_normal((n, d)).astype(np.float32)
    texts = texts if texts is not None else [f"a photo of thing {i} — ünïcode" for i in range(n)]
    ids = ids if ids is not None else [f"doc-{i}" for i in range(n)]
    return dict(
        rows_in_task=np.arange(start, start + n * step, step, dtype=np.int64), texts=list(texts),
        emb=schema.encode_embedding(x, dtype), ids=list(ids), rows=[1000 + 3 * i for i in range(n)],
        n_tokens=rng.integers(2, 78, size=n), truncated=rng.random(n) < 0.3, model=MODEL, aligner=ALIGNER,
        src=schema.encode_embedding(s, dtype) if src else None,
    )


def _dict_samples(task, c):
    """Today's path: one ``sample_members`` dict per sample (as generate/task.py built them)."""
    for i in range(len(c["texts"])):
        meta = {"id": c["ids"][i], "row": int(c["rows"][i]), "n_tokens": int(c["n_tokens"][i]),
                "truncated": bool(c["truncated"][i]), "model": c["model"], "aligner": c["aligner"]}
        yield schema.sample_members(schema.make_key(task, int(c["rows_in_task"][i])), c["texts"][i], c["emb"][i],
                                    meta, None if c["src"] is None else c["src"][i])


def _webdataset_bytes(task, c):
    buf = io.BytesIO()
    tw = wds.TarWriter(buf, encoder=False, mtime=0, user=schema.TAR_USER, group=schema.TAR_USER, mode=schema.TAR_MODE)
    for sample in _dict_samples(task, c):
        tw.write(sample)
    tw.close()
    return buf.getvalue()


def _both(tmp_path, task, c, **kw):
    a, b = tmp_path / "old", tmp_path / "new"
    a.mkdir(exist_ok=True), b.mkdir(exist_ok=True)
    old = writer.write_shard(a, task, _dict_samples(task, c))
    new = writer.write_task_shard(b, task, **c, **kw)
    name = schema.shard_name(task)
    return old, new, (a / name).read_bytes(), (b / name).read_bytes()


@pytest.fixture(params=["uniform", "general"])
def layout(request, monkeypatch):
    """Run a test with the strided fast layout (default) and with the block-scatter layout only."""
    if request.param == "general":
        monkeypatch.setattr(writer.TaskShardFormatter, "uniform_fast_path", False)
    return request.param


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("src", [False, True])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_identical_bytes_to_sample_dicts_and_webdataset(tmp_path, dtype, src, n, layout):
    c = _columns(n, dtype=dtype, src=src, d=24 if dtype == "fp32" else 8)
    old, new, old_bytes, new_bytes = _both(tmp_path, 5, c, chunk=16)
    assert new_bytes == old_bytes
    assert new == old and new["nsamples"] == n and new["bytes"] == len(new_bytes)
    assert new["sha256"] == writer.file_sha256(tmp_path / "new" / "shard-000005.tar")
    assert new_bytes == _webdataset_bytes(5, c)
    if n:
        assert (new["key_first"], new["key_last"]) == ("s000005-000000", schema.make_key(5, n - 1))
    else:
        assert new["key_first"] is None and new["key_last"] is None and len(new_bytes) == 10240


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_identical_bytes_on_nasty_texts_and_ids(tmp_path, chunk, layout):
    n = len(NASTY_TEXTS)
    ids = (NASTY_IDS * 2)[:n]
    c = _columns(n, d=512, src=True, texts=NASTY_TEXTS, ids=ids)
    old, new, old_bytes, new_bytes = _both(tmp_path, 2, c, chunk=chunk)
    assert new_bytes == old_bytes and new == old
    assert new_bytes == _webdataset_bytes(2, c)
    got = list(reader.iter_samples(tmp_path / "new" / "shard-000002.tar"))
    assert [s["text"] for s in got] == NASTY_TEXTS and [s["meta"]["id"] for s in got] == ids


def test_json_member_is_canonical_json_for_any_id(tmp_path):
    # every id needing an escape in its own chunk next to a plain one, plus non-str ids (fallback path)
    ids = [x for bad in NASTY_IDS for x in ("plain", bad)] + [7, None, "end"]
    n = len(ids)
    c = _columns(n, ids=ids)
    c["model"], c["aligner"] = 'm "q" \\ ü\n%s', "al\x00ign"
    old, new, old_bytes, new_bytes = _both(tmp_path, 0, c, chunk=2)
    assert new_bytes == old_bytes
    with tarfile.open(tmp_path / "new" / "shard-000000.tar") as tf:
        metas = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".json")]
    for i, raw in enumerate(metas):
        meta = {"id": ids[i], "row": c["rows"][i], "n_tokens": int(c["n_tokens"][i]),
                "truncated": bool(c["truncated"][i]), "model": c["model"], "aligner": c["aligner"]}
        assert raw == schema.canonical_json(meta).encode("utf-8")


def test_large_rows_in_task_and_task_index(tmp_path, layout):
    # 7+ digit keys (longer member names) and a 7-digit task; keys still increase as strings
    c = _columns(4, start=10**6, step=12345)
    old, new, old_bytes, new_bytes = _both(tmp_path, 1234567, c)
    assert new_bytes == old_bytes and new["key_first"] == "s1234567-1000000"
    c = _columns(3, start=10**12, step=10**11)
    old, new, old_bytes, new_bytes = _both(tmp_path, 3, c, chunk=2)
    assert new_bytes == old_bytes and new["key_last"] == "s000003-1200000000000"
    # 6- and 7+-digit keys in one chunk ("000005" < "1000000" as strings too)
    c = _columns(4)
    c["rows_in_task"] = [5, 10**6, 2 * 10**6, 3 * 10**6]
    old, new, old_bytes, new_bytes = _both(tmp_path, 9, c)
    assert new_bytes == old_bytes and new["key_last"] == "s000009-3000000"
    # sparse rows (rejects in between) below 10**6
    c = _columns(5)
    c["rows_in_task"] = np.array([0, 2, 3, 999_998, 999_999])
    assert _both(tmp_path, 4, c)[2] == _both(tmp_path, 4, c)[3]


def test_keys_must_increase(tmp_path):
    for rit in ([0, 2, 2], [3, 1, 5], [999_999, 1_000_000]):  # the last one: "1000000" < "999999" as strings
        c = _columns(len(rit))
        c["rows_in_task"] = rit
        with pytest.raises(ValueError, match=r"shard-000007\.tar: sample keys must increase"):
            writer.write_task_shard(tmp_path, 7, **c)
        with pytest.raises(ValueError, match=r"shard-000007\.tar: sample keys must increase"):
            writer.write_shard(tmp_path, 7, _dict_samples(7, c))
    c = _columns(2)
    c["rows_in_task"] = [-1, 0]
    with pytest.raises(ValueError, match=">= 0"):
        writer.write_task_shard(tmp_path, 7, **c)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("column", ["rows_in_task", "texts", "emb", "ids", "rows", "n_tokens", "truncated", "src"])
def test_mismatched_columns_raise(tmp_path, column):
    c = _columns(4, src=True)
    c[column] = c[column][:3]
    with pytest.raises(ValueError, match=r"shard-000001\.tar: column lengths differ"):
        writer.write_task_shard(tmp_path, 1, **c)
    assert list(tmp_path.iterdir()) == []


def test_bad_embedding_arrays_raise(tmp_path):
    c = _columns(3)
    with pytest.raises(ValueError, match="storage dtype"):
        writer.write_task_shard(tmp_path, 0, **{**c, "emb": c["emb"].astype(np.float64)})
    with pytest.raises(ValueError, match="2-D"):
        writer.write_task_shard(tmp_path, 0, **{**c, "emb": c["emb"][:, 0]})
    with pytest.raises(ValueError, match="integers"):
        writer.write_task_shard(tmp_path, 0, **{**c, "rows": [1.5, 2.0, 3.0]})
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_embeddings(tmp_path, layout):
    c = _columns(6, d=16, src=True)
    c["emb"] = np.asfortranarray(c["emb"])
    c["src"] = np.concatenate([c["src"], c["src"]], axis=1)[:, ::2]
    old, new, old_bytes, new_bytes = _both(tmp_path, 0, c)
    assert new_bytes == old_bytes


def test_events_order(tmp_path):
    events = []
    c = _columns(10)
    writer.write_task_shard(tmp_path, 0, **c, on_event=events.append, chunk=4)
    assert events == ["sample"] * 10 + ["before_rename"]
    events.clear()
    writer.write_task_shard(tmp_path, 1, **_columns(0), on_event=events.append)
    assert events == ["before_rename"]


def test_failure_mid_write_leaves_no_shard_and_no_temp(tmp_path):
    c = _columns(10)
    seen = []

    def boom(event):
        seen.append(event)
        if len(seen) == 5:
            raise RuntimeError("killed mid tar")

    with pytest.raises(RuntimeError, match="mid tar"):
        writer.write_task_shard(tmp_path, 0, **c, on_event=boom, chunk=2)
    assert list(tmp_path.iterdir()) == []
    # an unencodable text in a later chunk (lone surrogate) fails while formatting that chunk
    c["texts"][7] = "bad \ud800"
    with pytest.raises(UnicodeEncodeError):
        writer.write_task_shard(tmp_path, 0, **c, chunk=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="before rename"):
        writer.write_task_shard(tmp_path, 0, **_columns(3), on_event=lambda e: (_ for _ in ()).throw(
            RuntimeError("before rename")) if e == "before_rename" else None)
    assert list(tmp_path.iterdir()) == []


def test_readable_by_tarfile_and_webdataset(tmp_path):
    c = _columns(12, d=16, dtype="bf16", src=True, texts=NASTY_TEXTS[:12])
    entry = writer.write_task_shard(tmp_path, 3, **c, chunk=5)
    path = tmp_path / entry["name"]
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [m.name for m in members[:4]] == ["s000003-000000.emb.npy", "s000003-000000.json",
                                               "s000003-000000.src.npy", "s000003-000000.txt"]
        assert all(m.mtime == 0 and m.uname == "anisogen" and m.mode == 0o444 for m in members)
        np.testing.assert_array_equal(schema.npy_load(tf.extractfile(members[0]).read()), c["emb"][0])
    ds = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in ds] == [schema.make_key(3, i) for i in range(12)]
    assert [s["txt"].decode("utf-8") for s in ds] == NASTY_TEXTS[:12]
    assert [json.loads(s["json"])["n_tokens"] for s in ds] == [int(v) for v in c["n_tokens"]]
    np.testing.assert_array_equal(np.stack([schema.npy_load(s["src.npy"]) for s in ds]), c["src"])


def test_member_order_is_sorted_extensions():
    assert sorted([schema.TEXT_EXT, schema.EMB_EXT, schema.META_EXT, schema.SRC_EXT]) == [
        "emb.npy", "json", "src.npy", "txt"]
