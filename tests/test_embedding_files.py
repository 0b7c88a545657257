"""anisogen.embedding_files: listing, sidecars, checks and reads of embedding .npy files and folders."""

import json

import numpy as np
import pytest

from anisogen.embedding_files import (
    EmbeddingFileError, EmbeddingInput, find_sidecar, list_embedding_files, natural_key, open_embeddings,
    read_sidecar, write_embeddings,
)
from anisogen.encode.images import save_image_embeddings
from anisogen.encode.text_corpus import save_text_embeddings

FP = "toy|test|sha256=0"


def unit(rng, n, d=8, dtype=np.float32):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_single_file_with_its_stem_sidecar(tmp_path, rng):
    rows = unit(rng, 50)
    write_embeddings(tmp_path / "images.npy", rows, model_fingerprint=FP, kind="image")
    assert find_sidecar(tmp_path / "images.npy") == tmp_path / "images.json"
    src = open_embeddings(tmp_path / "images.npy", chunk_size=7)
    assert (src.count, src.dim, src.model_fingerprint) == (50, 8, FP)
    assert src.files == [tmp_path / "images.npy"]
    np.testing.assert_array_equal(src.load(), rows)
    np.testing.assert_array_equal(np.concatenate(list(src.iter_chunks())), rows)
    assert [len(c) for c in src.iter_chunks()] == [7] * 7 + [1]


def test_folder_in_natural_order_clip_retrieval_layout(tmp_path, rng):
    d = tmp_path / "img_emb"
    d.mkdir()
    parts = {i: unit(rng, 3 + i) for i in (0, 1, 2, 10, 11)}
    for i, a in parts.items():
        np.save(d / f"img_emb_{i}.npy", a)
    names = [f.name for f in list_embedding_files(d)]
    assert names == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy", "img_emb_10.npy", "img_emb_11.npy"]
    assert sorted(["img_emb_10.npy", "img_emb_2.npy"], key=natural_key) == ["img_emb_2.npy", "img_emb_10.npy"]
    want = np.concatenate([parts[i] for i in (0, 1, 2, 10, 11)])
    src = open_embeddings(d, chunk_size=4)
    assert src.count == len(want) and src.model_fingerprint is None
    np.testing.assert_array_equal(src.load(), want)
    # the clip-retrieval output folder (holding img_emb/) and a glob give the same files
    assert list_embedding_files(tmp_path) == list_embedding_files(d)
    assert list_embedding_files(d / "img_emb_*.npy") == list_embedding_files(d)
    # one folder meta file covers every part (second sidecar layout)
    (d / "img_emb.json").write_text(json.dumps({"model": FP}))
    assert find_sidecar(d / "img_emb_10.npy") == d / "img_emb.json"
    assert open_embeddings(d).model_fingerprint == FP


def test_write_embedding_set_layouts_are_read(tmp_path, rng):
    rows = unit(rng, 20)
    save_image_embeddings(tmp_path / "img", rows, [f"k{i}" for i in range(20)], meta={"model": FP}, dtype="fp16")
    save_text_embeddings(tmp_path / "txt", rows, [f"t{i}" for i in range(20)], [], meta={"model": FP})
    img, txt = open_embeddings(tmp_path / "img"), open_embeddings(tmp_path / "txt")
    assert img.files == [tmp_path / "img" / "img_emb.npy"] and txt.files == [tmp_path / "txt" / "text_emb.npy"]
    assert find_sidecar(txt.files[0]) == tmp_path / "txt" / "text_emb.json"  # not img_emb.json
    assert img.model_fingerprint == txt.model_fingerprint == FP
    assert img.dtypes == [np.float16]
    np.testing.assert_allclose(img.load(), rows, atol=1e-3)


def test_fingerprint_mismatch_and_corrupt_sidecar(tmp_path, rng):
    write_embeddings(tmp_path / "a.npy", unit(rng, 5), model_fingerprint=FP)
    assert open_embeddings(tmp_path / "a.npy", model_fingerprint=FP).model_fingerprint == FP
    with pytest.raises(EmbeddingFileError, match=r"a\.npy: embeddings were computed with 'toy\|test.*not 'ViT-B-32'"):
        open_embeddings(tmp_path / "a.npy", model_fingerprint="ViT-B-32")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(EmbeddingFileError, match=r"a\.json: sidecar is not valid JSON") as info:
        read_sidecar(tmp_path / "a.npy")
    assert "\n" not in str(info.value)
    (tmp_path / "a.json").write_text("[1]")
    with pytest.raises(EmbeddingFileError, match=r"a\.json: sidecar must be a JSON object"):
        open_embeddings(tmp_path / "a.npy")
    d = tmp_path / "mixed"
    d.mkdir()
    write_embeddings(d / "p0.npy", unit(rng, 5), model_fingerprint=FP)
    write_embeddings(d / "p1.npy", unit(rng, 5), model_fingerprint="ViT-B-32")
    with pytest.raises(EmbeddingFileError, match="files come from different CLIP models"):
        open_embeddings(d)


def test_bad_files_are_refused_naming_file_and_row(tmp_path, rng):
    d = tmp_path / "parts"
    d.mkdir()
    np.save(d / "p_0.npy", unit(rng, 4, 8))
    np.save(d / "p_1.npy", unit(rng, 4, 6))
    with pytest.raises(EmbeddingFileError, match=r"p_1\.npy: dimension mismatch, expected d=8 .* got d=6"):
        open_embeddings(d)
    bad = unit(rng, 300)
    bad[213, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    src = open_embeddings(tmp_path / "nan.npy", chunk_size=64)
    with pytest.raises(EmbeddingFileError, match=r"nan\.npy: row 213 contains NaN or Inf"):
        src.load()
    with pytest.raises(EmbeddingFileError, match=r"nan\.npy: row 213 contains NaN or Inf"):
        src.rows([5, 213])
    np.testing.assert_array_equal(src.rows([5, 7]), bad[[5, 7]])  # only the asked rows are read
    np.testing.assert_array_equal(src.load(limit=200), bad[:200])
    np.save(tmp_path / "ints.npy", np.ones((3, 2), dtype=np.int64))
    with pytest.raises(EmbeddingFileError, match=r"ints\.npy: unsupported dtype int64"):
        open_embeddings(tmp_path / "ints.npy")
    np.save(tmp_path / "flat.npy", np.ones(3, dtype=np.float32))
    with pytest.raises(EmbeddingFileError, match=r"flat\.npy: expected a 2-D"):
        open_embeddings(tmp_path / "flat.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingFileError, match="holds no .npy"):
        open_embeddings(tmp_path / "empty")
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        open_embeddings(tmp_path / "missing.npy")
    with pytest.raises(EmbeddingFileError, match="matches no .npy"):
        open_embeddings(tmp_path / "zz_*.npy")


def test_rows_at_positions_equal_full_load_rows_and_float16(tmp_path, rng):
    d = tmp_path / "img_emb"
    d.mkdir()
    for i, n in enumerate((13, 1, 40, 7)):
        np.save(d / f"img_emb_{i}.npy", unit(rng, n, 16, np.float16))
    src = open_embeddings(d, chunk_size=5)
    full = src.load()
    assert full.dtype == np.float32 and full.shape == (61, 16)
    positions = np.random.default_rng(1).choice(61, 25, replace=False)  # unsorted, across every file
    np.testing.assert_array_equal(src.rows(positions), full[positions])
    keep = np.sort(positions)
    np.testing.assert_array_equal(src.load(keep=keep), full[keep])
    normed = src.load(normalize=True, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-12)
    with pytest.raises(EmbeddingFileError, match="row positions"):
        src.rows([61])


def test_fit_input_reads_text_sidecars_and_checks_norms(tmp_path, rng):
    rows = unit(rng, 30)
    save_text_embeddings(tmp_path / "txt", rows, [str(i) for i in range(30)], [], meta={"model": FP})
    side = EmbeddingInput("text", [tmp_path / "txt"], chunk_size=8)
    assert side.fingerprints == {FP}  # text_emb.json, not only img_emb.json
    assert side.validate(normalize=False, dim=None) == (30, 8)
    np.testing.assert_array_equal(np.concatenate(list(side())), rows)
    bad = rows.copy()
    bad[11] *= 3
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(EmbeddingFileError, match=r"bad\.npy: row 11 has L2 norm 3\.0.*pass --normalize"):
        EmbeddingInput("text", [tmp_path / "bad.npy"]).validate(normalize=False, dim=None,
                                                                 normalize_hint="pass --normalize")
