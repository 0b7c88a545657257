"""The fast shard reader (issue 16): every reader decodes identically, and every format violation is a
``ShardFormatError`` naming the shard and the sample key."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from anisogen.shards import ShardFormatError, decode, reader, schema, writer

MODEL = "ViT-B-32|openai|sha256=0123abcd"
ALIGNER = "centroid"
D = 16
TEXTS = ["a photo of a cat", "", "emoji 🐈‍⬛🚀 and CJK 猫の写真", "NUL\x00inside\x00", "new\nlines\r\n\tand tabs",
         "x" * 511, "y" * 512, "z" * 513, "ü" * 700, "long " * 300]


def _columns(n, *, d=D, dtype="fp16", src=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(n)]
    return dict(
        rows_in_task=np.arange(0, 2 * n, 2, dtype=np.int64), texts=texts, emb=schema.encode_embedding(x, dtype),
        ids=[f"doc-{i}" for i in range(n)], rows=[1000 + i for i in range(n)], n_tokens=rng.integers(2, 78, size=n),
        truncated=rng.random(n) < 0.3, model=MODEL, aligner=ALIGNER,
        src=schema.encode_embedding(rng.standard_normal((n, d)).astype(np.float32), dtype) if src else None,
    )


def _shard(tmp_path, n=37, task=3, **kw):
    writer.write_task_shard(tmp_path, task, **_columns(n, **kw))
    return tmp_path / schema.shard_name(task)


def _reference(path):
    """The tarfile reader + decode_wds_sample (the previous iter_samples path)."""
    return [reader.decode_wds_sample(raw) for raw in reader.iter_tar_samples(path)]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("src", [False, True])
def test_every_reader_decodes_identically(tmp_path, dtype, src):
    path = _shard(tmp_path, dtype=dtype, src=src)
    c = _columns(37, dtype=dtype, src=src)
    ref = _reference(path)
    keys = [r["key"] for r in ref]
    assert keys == [schema.make_key(3, 2 * i) for i in range(37)]
    expect = decode.storage_to_float32(c["emb"])
    np.testing.assert_array_equal(np.stack([r["emb"] for r in ref]), expect)
    fields = ("emb", "txt", "json") + (("src",) if src else ())
    cols = reader.read_shard(path, fields=fields, dim=D)
    assert cols.keys == keys and len(cols) == 37
    assert cols.emb.dtype == np.float32 and cols.emb.shape == (37, D)
    np.testing.assert_array_equal(cols.emb, expect)
    assert cols.txt == c["texts"] == [r["text"] for r in ref]
    assert cols.json == [r["meta"] for r in ref] and cols.json[5]["id"] == "doc-5"
    if src:
        np.testing.assert_array_equal(cols.src, np.stack([r["src"] for r in ref]))
        np.testing.assert_array_equal(cols.src, decode.storage_to_float32(c["src"]))
    else:
        assert cols.src is None and all(r["src"] is None for r in ref)
    for got, r in zip(reader.iter_shard(path, fields=fields), ref):
        assert got["key"] == r["key"] and got["txt"] == r["text"] and got["json"] == r["meta"]
        np.testing.assert_array_equal(got["emb"], r["emb"])
        if src:
            np.testing.assert_array_equal(got["src"], r["src"])
    for got, r in zip(reader.iter_samples(path), ref, strict=True):
        assert got["key"] == r["key"] and got["text"] == r["text"] and got["meta"] == r["meta"]
        np.testing.assert_array_equal(got["emb"], r["emb"])
    raw_fast = list(reader.iter_samples(path, decode=False))
    raw_ref = list(reader.iter_tar_samples(path))
    assert raw_fast == raw_ref
    ds = wds.WebDataset([str(path)], shardshuffle=False).map(reader.decode_wds_sample)
    for got, r in zip(ds, ref, strict=True):
        assert got["key"] == r["key"] and got["text"] == r["text"] and got["meta"] == r["meta"]
        np.testing.assert_array_equal(got["emb"], r["emb"])
    # emb-only read
    emb_only = reader.read_shard(path)
    assert emb_only.txt is None and emb_only.json is None
    np.testing.assert_array_equal(emb_only.emb, expect)


def test_shard_view_reads_a_subset_of_rows_like_the_whole_columns(tmp_path):
    path = _shard(tmp_path, src=True)
    whole = reader.read_shard(path, fields=("emb", "src", "txt", "json"), dim=D)
    rows = [0, 5, 6, 36]
    with reader.ShardView(path) as view:
        assert view.keys == whole.keys and len(view) == 37
        np.testing.assert_array_equal(view.column("emb", rows=rows, dim=D), whole.emb[rows])
        np.testing.assert_array_equal(view.column("src", rows=np.array(rows)), whole.src[rows])
        assert view.column("txt", rows=rows) == [whole.txt[i] for i in rows]
        assert view.column("json", rows=rows) == [whole.json[i] for i in rows]
        assert view.column("emb", rows=[]).shape[0] == 0
        raw = view.raw(6)
        assert raw["__key__"] == whole.keys[6] and bytes(raw["txt"]).decode() == whole.txt[6]
    with pytest.raises(ShardFormatError, match="truncated tar"):
        (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:3000])
        reader.ShardView(tmp_path / "cut.tar")


def test_read_embeddings_and_limit_match_reference(tmp_path):
    for task in range(3):
        entry = writer.write_task_shard(tmp_path, task, **_columns(5 + task, seed=task, src=True))
        writer.write_record(tmp_path, {**entry, "rows": [100 * task, 100 * task + 5 + task], "rejects": 0,
                                       "reject_reasons": {}, "reject_list": [], "stats": {}})
    header = {"dim": D, "num_tasks": 3, "config": {}, "config_fingerprint": schema.fingerprint({})}
    writer.assemble(tmp_path, header, writer.list_records(tmp_path), complete=True)
    ref = [s for t in range(3) for s in _reference(tmp_path / schema.shard_name(t))]
    arr, keys, texts = reader.read_embeddings(tmp_path, with_keys=True, with_text=True)
    np.testing.assert_array_equal(arr, np.stack([r["emb"] for r in ref]))
    assert keys == [r["key"] for r in ref] and texts == [r["text"] for r in ref]
    np.testing.assert_array_equal(reader.read_embeddings(tmp_path, field="src"), np.stack([r["src"] for r in ref]))
    np.testing.assert_array_equal(reader.read_embeddings(tmp_path, limit=7), arr[:7])
    assert reader.verify_folder(tmp_path)["samples"] == 18


def test_empty_shard(tmp_path):
    path = _shard(tmp_path, n=0)
    cols = reader.read_shard(path, fields=("emb", "txt", "json"), dim=D)
    assert cols.keys == [] and cols.emb.shape == (0, D) and cols.txt == [] and cols.json == []
    assert list(reader.iter_shard(path)) == [] == _reference(path)


def test_non_uniform_layout_falls_back_and_agrees(tmp_path):
    """Different payload strides (long texts) and mixed embedding headers still read correctly."""
    path = _shard(tmp_path, n=12)
    cols = reader.read_shard(path, fields=("emb",))
    np.testing.assert_array_equal(cols.emb, np.stack([r["emb"] for r in _reference(path)]))
    mixed = tmp_path / "mixed.tar"
    samples = [("s000000-000000", np.ones(D, np.float16)), ("s000000-000001", np.full(D, 2, np.float32)),
               ("s000000-000002", schema.float32_to_bf16_bits(np.full(D, 3, np.float32)))]
    _tar(mixed, [m for key, e in samples for m in _members(key, emb=schema.npy_bytes(e))])
    got = reader.read_shard(mixed, fields=("emb", "txt", "json"))
    np.testing.assert_array_equal(got.emb, np.stack([np.full(D, v, np.float32) for v in (1, 2, 3)]))


def test_directories_and_ustar_prefix_names(tmp_path):
    path = tmp_path / "dirs.tar"
    deep = "d" * 90 + "/" + "e" * 60  # > 100 chars: tarfile stores it with the ustar prefix field
    members = _members(f"{deep}/s000000-000000") + _members("sub/s000000-000001")
    _tar(path, members, dirs=["sub"])
    ref = _reference(path)
    cols = reader.read_shard(path, fields=("emb", "txt", "json"))
    assert cols.keys == [r["key"] for r in ref] == [f"{deep}/s000000-000000", "sub/s000000-000001"]
    assert list(reader.iter_samples(path, decode=False)) == list(reader.iter_tar_samples(path))


# ------------------------------------------------------------------------------- corrupt shards
def _emb(key="x"):
    return schema.npy_bytes(np.full(D, 0.25, np.float16))


def _members(key, *, emb=None, txt=b"a caption", meta=None):
    meta = meta if meta is not None else json.dumps({"id": key, "model": MODEL}).encode()
    out = []
    if emb is not False:
        out.append((f"{key}.emb.npy", _emb() if emb is None else emb))
    out += [(f"{key}.json", meta), (f"{key}.txt", txt)]
    return out


def _tar(path, members, dirs=()):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _bad_shard(tmp_path, bad_key="s000000-000001", **kw):
    members = []
    for i in range(3):
        key = f"s000000-{i:06d}"
        members += _members(key, **(kw if key == bad_key else {}))
    return _tar(tmp_path / "shard-000000.tar", members)


def _expect_error(path, key, pattern, fields=("emb", "txt", "json"), dim=D, reference=True):
    for fn in (lambda: reader.read_shard(path, fields=fields, dim=dim),
               lambda: list(reader.iter_shard(path, fields=fields, dim=dim)),
               lambda: list(reader.iter_samples(path))):
        with pytest.raises(ShardFormatError, match=pattern) as info:
            fn()
        err = info.value
        assert err.shard == str(path) and err.key == key, (err.shard, err.key)
        assert str(err).startswith(f"{path}: sample {key}: ") and "\n" not in str(err)
    if reference:  # the tarfile / webdataset route decodes members through the same function
        with pytest.raises(ShardFormatError, match=pattern) as info:
            [reader.decode_wds_sample(r) for r in reader.iter_tar_samples(path)]
        assert info.value.key == key


@pytest.mark.parametrize("emb, pattern", [
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f2',", r"unreadable emb\.npy"),
    (b"not an npy at all", r"unreadable emb\.npy"),
    (schema.npy_bytes(np.full(D, 0.5, np.float64)), r"emb\.npy is stored as float64; expected float16"),
    (schema.npy_bytes(np.arange(D, dtype=np.int32)), r"emb\.npy is stored as int32"),
    (schema.npy_bytes(np.array([np.nan] + [0.1] * (D - 1), np.float16)), r"emb\.npy contains NaN or Inf"),
    (schema.npy_bytes(np.array([np.inf] + [0.1] * (D - 1), np.float32)), r"emb\.npy contains NaN or Inf"),
    (schema.npy_bytes(np.zeros((2, D), np.float16)), r"emb\.npy has shape \(2, 16\): \(n, d\) multi-vector .*reserved"),
    (schema.npy_bytes(np.zeros(0, np.float16)), r"emb\.npy has shape \(0,\)"),
    (schema.npy_bytes(np.zeros(D, np.float16))[:-3], r"unreadable emb\.npy: payload is 29 bytes"),
])
def test_corrupt_embedding_member(tmp_path, emb, pattern):
    _expect_error(_bad_shard(tmp_path, emb=emb), "s000000-000001", pattern)


def test_wrong_dimension(tmp_path):
    path = _bad_shard(tmp_path, emb=schema.npy_bytes(np.zeros(D + 1, np.float16)))
    pattern = r"emb\.npy has shape \(17,\), expected \(16,\) \(dimension mismatch\)"
    for fn in (lambda: reader.read_shard(path, dim=D), lambda: list(reader.iter_shard(path, dim=D))):
        with pytest.raises(ShardFormatError, match=pattern) as info:
            fn()
        assert info.value.key == "s000000-000001"
    uniform = _shard(tmp_path, n=4)
    with pytest.raises(ShardFormatError, match=r"sample s000003-000000: emb\.npy has shape \(16,\), expected \(8,\)"):
        reader.read_shard(uniform, dim=8)


def test_non_utf8_text_and_bad_json(tmp_path):
    _expect_error(_bad_shard(tmp_path, txt=b"caf\xe9"), "s000000-000001", r"txt is not valid UTF-8")
    _expect_error(_bad_shard(tmp_path, meta=b'{"id": '), "s000000-000001", r"json is not valid JSON")
    _expect_error(_bad_shard(tmp_path, meta=b"[1, 2]"), "s000000-000001", r"json is not a JSON object")
    # fields that are not requested are not decoded
    assert len(reader.read_shard(_bad_shard(tmp_path, txt=b"caf\xe9"), fields=("emb",))) == 3


def test_missing_member(tmp_path):
    path = _bad_shard(tmp_path, emb=False)
    _expect_error(path, "s000000-000001", r"lacks member 'emb\.npy'")
    assert reader.read_shard(path, fields=("txt",)).txt == ["a caption"] * 3
    src = _shard(tmp_path / "s", n=3) if (tmp_path / "s").mkdir() is None else None
    with pytest.raises(
        ShardFormatError, match=r"sample s000003-000000: lacks member 'src\.npy' \(generate with --keep"
    ):
        reader.read_shard(src, fields=("emb", "src"))


def _header_offsets(path):
    with tarfile.open(path) as tf:
        return [(m.offset, m.name) for m in tf]


def test_truncated_tar(tmp_path):
    path = _shard(tmp_path, n=5)
    data = path.read_bytes()
    offsets = _header_offsets(path)
    (hoff, name), = [(o, n) for o, n in offsets if n == "s000003-000002.json"]
    for cut, label in [(hoff + 200, "in a header"), (hoff + 512 + 10, "in a payload"), (hoff, "at a header boundary")]:
        bad = tmp_path / f"cut-{cut}.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(ShardFormatError, match=r"truncated tar") as info:
            reader.read_shard(bad)
        assert info.value.shard == str(bad) and info.value.key == "s000003-000002", label
        with pytest.raises(ShardFormatError, match=r"truncated tar"):
            list(reader.iter_shard(bad))
    # cut just before the end-of-archive block: every member is whole but the archive is not
    end = offsets[-1][0] + 1024
    bad = tmp_path / "noend.tar"
    bad.write_bytes(data[:end])
    with pytest.raises(ShardFormatError, match=r"sample s000003-000008: truncated tar: the file ends without"):
        reader.read_shard(bad)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardFormatError, match=r"empty file"):
        reader.read_shard(empty)


def test_bad_header_checksum(tmp_path):
    path = _shard(tmp_path, n=5)
    data = bytearray(path.read_bytes())
    (hoff, _), = [(o, n) for o, n in _header_offsets(path) if n == "s000003-000004.txt"]
    data[hoff + 136] ^= 0x01  # mtime field: the header still parses, only the checksum disagrees
    path.write_bytes(bytes(data))
    # tarfile silently stops at a bad header after the first one (3 of 5 samples, the last without txt)
    assert len(list(reader.iter_tar_samples(path))) == 3
    for fn in (lambda: reader.read_shard(path), lambda: list(reader.iter_shard(path))):
        with pytest.raises(ShardFormatError, match=r"sample s000003-000004: tar header at byte \d+ has a bad checksum"):
            fn()


def test_checksum_spellings_are_accepted(tmp_path):
    """tarfile writes '%06o\\0 ', the generator '%07o\\0'; leading spaces are valid too."""
    path = _bad_shard(tmp_path)  # tarfile-written
    assert len(reader.read_shard(path)) == 3
    data = bytearray(path.read_bytes())
    field = bytes(data[148:156])
    value = int(field.split(b"\0")[0], 8)
    data[148:156] = b"  %05o\0" % value
    path.write_bytes(bytes(data))
    assert len(reader.read_shard(path)) == 3


def test_unknown_field_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown sample field"):
        reader.read_shard(_shard(tmp_path, n=1), fields=("text",))


def test_decode_member_embedding_rules():
    x = np.array([1.5, -2.0, 0.25], np.float32)
    for stored in (x.astype(np.float16), schema.float32_to_bf16_bits(x), x):
        got = decode.decode_member_embedding(schema.npy_bytes(stored), shard="s.tar", key="k", dim=3)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, x)
    with pytest.raises(ShardFormatError, match=r"^s\.tar: sample k: src\.npy is stored as float64"):
        decode.decode_member_embedding(schema.npy_bytes(x.astype(np.float64)), shard="s.tar", key="k", ext="src.npy")
    err = ShardFormatError("a.tar", "k1", "multi\nline reason")
    assert str(err) == "a.tar: sample k1: multi line reason" and isinstance(err, ValueError)
    import pickle

    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_trainer_and_decode_sample_use_the_one_decoder():
    from anisogen.train.data import SampleError, decode_embedding

    two_d = schema.npy_bytes(np.zeros((2, 4), np.float16))
    with pytest.raises(SampleError, match=r"^rec: emb\.npy has shape \(2, 4\): \(n, d\) multi-vector"):
        decode_embedding(two_d, name="rec")
    with pytest.raises(SampleError, match=r"stored as float64"):
        decode_embedding(schema.npy_bytes(np.ones(4)), name="rec")
    assert decode_embedding(schema.npy_bytes(np.ones(4, np.float16)), name="rec").shape == (1, 4)
    got = decode.decode_sample({"txt": b"hi", "json": b'{"a": 1}', "emb.npy": schema.npy_bytes(np.ones(2, np.float16))},
                               shard="s", key="k", fields=("emb", "txt", "json"))
    assert got["key"] == "k" and got["txt"] == "hi" and got["json"] == {"a": 1} and got["emb"].tolist() == [1, 1]
    with pytest.raises(ShardFormatError, match=r"^s: sample k: lacks member 'src\.npy'"):
        decode.decode_sample({}, shard="s", key="k", fields=("src",))


def test_gnu_and_pax_tars(tmp_path):
    members = _members("s000000-000000") + _members("s000000-000001")
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"fmt{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        assert reader.read_shard(path, fields=("emb", "txt", "json")).keys == [r["key"] for r in _reference(path)]
    long = tmp_path / "pax.tar"
    with tarfile.open(long, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("ü" * 120 + ".txt")  # non-ASCII long name: needs a pax header
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ShardFormatError, match="unsupported tar member type: pax extended header"):
        reader.read_shard(long, fields=("txt",))


def test_a_damaged_manifest_is_a_one_line_value_error(tmp_path):
    from anisogen.shards import load_manifest

    (tmp_path / "manifest.json").write_text('{"format": "anisogen-shards", "status": ')
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON .*--overwrite"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected 'anisogen-shards'"):
        load_manifest(tmp_path)
