"""Reading audit inputs: sampling, storage dtypes, fingerprints, and every bad-input case with a clear error."""

import json

import numpy as np
import pytest

from anisogen.audit.loading import (
    AuditInputError, _hashed_shards, check_consistency, load_images, load_paired, load_shard_folder, sidecar_path,
    write_embeddings_npy,
)
from anisogen.shards.writer import file_sha256
from conftest import unit_rows
from test_audit_fixtures import FP, OTHER_FP, write_shard_folder

D = 16


@pytest.fixture
def rows(rng):
    return unit_rows(rng, 350, D).astype(np.float32)


@pytest.fixture
def folder(tmp_path, rows):
    return write_shard_folder(tmp_path / "shards", rows, rows[:, ::-1].copy(), samples_per_shard=100)


# ------------------------------------------------------------------------------------ happy paths
def test_reads_every_row_in_order_with_src_and_provenance(folder, rows):
    got = load_shard_folder(folder)
    assert got.n == got.n_total == 350 and got.dim == D
    np.testing.assert_allclose(got.emb, rows, atol=1e-3)  # fp16 storage
    np.testing.assert_allclose(got.src, rows[:, ::-1], atol=1e-3)
    assert got.keys[0] == "s000000-000000" and got.keys[-1] == "s000003-000049"
    assert got.model_fingerprint == FP and got.aligner["name"] == "identity"
    assert got.manifest["num_shards"] == 4 and got.skipped == []


def test_seeded_sample_cap_is_deterministic_and_uniform(folder, rows):
    a = load_shard_folder(folder, max_samples=120, seed=3)
    b = load_shard_folder(folder, max_samples=120, seed=3)
    c = load_shard_folder(folder, max_samples=120, seed=4)
    assert a.n == 120 and a.n_total == 350 and a.keys == b.keys and a.keys != c.keys
    np.testing.assert_array_equal(a.emb, b.emb)
    positions = [int(k[1:7]) * 100 + int(k[8:]) for k in a.keys]
    assert positions == sorted(positions)
    np.testing.assert_allclose(a.emb, rows[positions], atol=1e-3)
    assert len({p // 100 for p in positions}) == 4  # drawn from every shard


@pytest.mark.parametrize("dtype,atol", [("bf16", 8e-3), ("fp32", 0.0), ("fp16", 1e-3)])
def test_storage_dtypes_decode(tmp_path, rows, dtype, atol):
    got = load_shard_folder(write_shard_folder(tmp_path / dtype, rows, dtype=dtype))
    np.testing.assert_allclose(got.emb, rows, atol=atol, rtol=0)
    assert got.emb.dtype == np.float32


def test_image_sources_npy_folder_and_shards(tmp_path, rows):
    write_embeddings_npy(tmp_path / "img.npy", rows.astype(np.float16), model_fingerprint=FP, kind="image")
    meta = json.loads(sidecar_path(tmp_path / "img.npy").read_text())
    assert meta == {"model": FP, "count": 350, "dim": D, "dtype": "float16", "kind": "image"}
    single = load_images(tmp_path / "img.npy", max_samples=100, seed=1)
    assert single.n == 100 and single.n_total == 350 and single.model_fingerprint == FP and not single.warnings
    parts = tmp_path / "img_emb"
    parts.mkdir()
    for i, s in enumerate(range(0, 350, 30)):  # 12 files: natural order puts _2 before _10
        write_embeddings_npy(parts / f"img_emb_{i}.npy", rows[s : s + 30], model_fingerprint=FP)
    many = load_images(parts)
    np.testing.assert_array_equal(many.emb, rows)
    assert many.kind == "npy-dir" and many.model_fingerprint == FP
    shards = load_images(write_shard_folder(tmp_path / "imgshards", rows, rows))
    assert shards.kind == "image-shards" and shards.src is None and shards.n == 350
    np.save(tmp_path / "bare.npy", rows)
    bare = load_images(tmp_path / "bare.npy")
    assert bare.model_fingerprint is None and "cannot be verified" in bare.warnings[0]


def test_paired_npz_and_folder(tmp_path, rows):
    np.savez(tmp_path / "p.npz", image=rows, text=rows[:, ::-1])
    (tmp_path / "p.json").write_text(json.dumps({"model_fingerprint": FP}))  # the alias key is accepted
    img, txt = load_paired(tmp_path / "p.npz", max_samples=50, seed=0)
    assert img.n == txt.n == 50 and img.keys == [k.replace("text", "image") for k in txt.keys]
    np.testing.assert_array_equal(txt.emb, img.emb[:, ::-1])
    assert img.model_fingerprint == FP
    d = tmp_path / "pdir"
    d.mkdir()
    write_embeddings_npy(d / "image.npy", rows, model_fingerprint=FP)
    write_embeddings_npy(d / "text.npy", rows, model_fingerprint=FP)
    img2, txt2 = load_paired(d)
    assert img2.n == 350 and txt2.model_fingerprint == FP


# ---------------------------------------------------------------------------------------- bad input
def test_missing_shard_is_named_and_skippable(folder):
    (folder / "shard-000001.tar").unlink()
    with pytest.raises(
        AuditInputError, match=r"shard-000001\.tar: shard listed in the manifest is missing.*--skip-corrupt"
    ):
        load_shard_folder(folder)
    got = load_shard_folder(folder, skip_corrupt=True)
    assert got.n == got.n_total == 250
    assert got.skipped == [{"source": str(folder), "shard": "shard-000001.tar", "key": None,
                            "reason": "shard listed in the manifest is missing"}]
    assert not any(k.startswith("s000001") for k in got.keys)
    assert got.summary()["skipped_shards"] == ["shard-000001.tar"]


def test_corrupt_shard_bytes_fail_the_hash(folder):
    path = folder / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AuditInputError, match=r"shard-000002\.tar: corrupt shard: sha256 differs"):
        load_shard_folder(folder, verify="full")
    assert load_shard_folder(folder, skip_corrupt=True, verify="full").n == 250


def test_verify_modes_hash_every_shard_a_seeded_share_or_none(tmp_path, rows):
    # 40 shards of 10; the last byte of every tar (end-of-archive padding, never parsed) is flipped, so only a
    # sha256 can tell: full names every shard, sample exactly its seeded share, none none of them
    folder = write_shard_folder(tmp_path / "many", np.vstack([rows, rows])[:400], samples_per_shard=10)
    for tar in sorted(folder.glob("shard-*.tar")):
        data = bytearray(tar.read_bytes())
        data[-1] ^= 0xFF
        tar.write_bytes(bytes(data))
    names = [f"shard-{i:06d}.tar" for i in range(40)]
    with pytest.raises(AuditInputError, match=r"shard-000000\.tar: corrupt shard: sha256 differs"):
        load_shard_folder(folder, verify="full")
    with pytest.raises(AuditInputError, match=r"no readable samples \(40 shards/samples skipped\)"):
        load_shard_folder(folder, verify="full", skip_corrupt=True)
    sample = load_shard_folder(folder, verify="sample", skip_corrupt=True, seed=5)
    hashed = sorted(_hashed_shards(40, "sample", 5))
    assert len(hashed) == 3  # ceil(40 / 16)
    assert [s["shard"] for s in sample.skipped] == [names[i] for i in hashed]
    assert all(s["reason"] == "corrupt shard: sha256 differs from the manifest" for s in sample.skipped)
    none = load_shard_folder(folder, verify="none")
    assert none.skipped == [] and none.n_total == 400
    with pytest.raises(AuditInputError, match="--verify must be one of full, sample, none"):
        load_shard_folder(folder, verify="some")


def test_moments_and_norms_cover_every_row_while_the_sample_is_capped(folder, rows):
    from anisogen.audit.metrics import moments, norm_stats
    from anisogen.shards import read_embeddings

    every = read_embeddings(folder)
    got = load_shard_folder(folder, max_samples=50, seed=1)
    assert got.n == 50 and got.moments.count == got.n_total == 350
    ref = moments(every.astype(np.float64) / np.linalg.norm(every.astype(np.float64), axis=1, keepdims=True))
    np.testing.assert_allclose(got.moments.total, ref.total, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.moments.outer, ref.outer, rtol=0, atol=1e-11)
    for key, value in norm_stats(every).items():
        assert got.norms[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_worker_processes_give_the_same_result(tmp_path, rows):
    from anisogen.audit.workers import TaskPool

    folder = write_shard_folder(tmp_path / "w", rows, rows[:, ::-1].copy(), samples_per_shard=50)
    write_embeddings_npy(tmp_path / "img.npy", rows, model_fingerprint=FP)
    local = load_shard_folder(folder, max_samples=100, seed=2)
    local_img = load_images(tmp_path / "img.npy", max_samples=100, seed=2)
    with TaskPool(2) as pool:
        par = load_shard_folder(folder, max_samples=100, seed=2, pool=pool)
        par_img = load_images(tmp_path / "img.npy", max_samples=100, seed=2, pool=pool)
        assert pool.started
    with TaskPool(2, min_work=10_000) as small:  # too little work to start processes for
        assert load_shard_folder(folder, max_samples=100, seed=2, pool=small).keys == local.keys
        assert not small.started
    for a, b in ((local, par), (local_img, par_img)):
        assert a.keys == b.keys and a.n_total == b.n_total
        np.testing.assert_array_equal(a.emb, b.emb)
        np.testing.assert_allclose(a.moments.outer, b.moments.outer, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(local.src, par.src)


def test_truncated_shard_fails_size_check(folder):
    path = folder / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(AuditInputError, match=r"shard-000000\.tar: corrupt shard: 5000 bytes on disk"):
        load_shard_folder(folder)


def test_unreadable_tar_with_matching_manifest_is_still_caught(folder):
    # a shard truncated *and* its manifest entry rewritten to match: caught when the tar is parsed
    path = folder / "shard-000003.tar"
    path.write_bytes(path.read_bytes()[:3000])
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][3]
    entry["bytes"], entry["sha256"] = 3000, file_sha256(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AuditInputError, match=r"shard-000003\.tar: (corrupt shard, cannot be read as a tar|holds \d+ "
                                              r"samples but the manifest lists 50)"):
        load_shard_folder(folder)
    assert load_shard_folder(folder, skip_corrupt=True).n == 300


def test_missing_or_incomplete_manifest(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AuditInputError, match=r"empty: .*no manifest\.json"):
        load_shard_folder(empty)
    with pytest.raises(AuditInputError, match=r"nope: shard folder does not exist"):
        load_shard_folder(tmp_path / "nope")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["status"] = "running"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AuditInputError, match=r"shards: generation is not complete"):
        load_shard_folder(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(AuditInputError, match=r"manifest\.json: not valid JSON"):
        load_shard_folder(folder)


def test_nan_sample_in_a_shard(tmp_path, rows):
    bad = rows[123].astype(np.float16)
    bad[4] = np.nan
    folder = write_shard_folder(tmp_path / "nan", rows, override={123: bad})
    with pytest.raises(AuditInputError, match=r"shard-000001\.tar sample s000001-000023: emb\.npy contains NaN or Inf"):
        load_shard_folder(folder)
    with pytest.raises(AuditInputError, match=r"s000001-000023: emb\.npy contains NaN"):
        load_shard_folder(folder, max_samples=10, seed=0)  # every row is checked, sampled or not
    got = load_shard_folder(folder, skip_corrupt=True)
    assert got.n == 349 and "s000001-000023" not in got.keys
    assert got.skipped[0]["key"] == "s000001-000023" and "NaN" in got.skipped[0]["reason"]


def test_inf_and_nan_in_image_npy_name_file_and_row(tmp_path, rows):
    bad = rows.copy()
    bad[77, 3] = np.inf
    np.save(tmp_path / "img.npy", bad)
    with pytest.raises(AuditInputError, match=r"img\.npy: row 77 contains NaN or Inf"):
        load_images(tmp_path / "img.npy", max_samples=20)
    paired = tmp_path / "p.npz"
    bad[5, 0] = np.nan
    np.savez(paired, image=rows, text=bad)
    with pytest.raises(AuditInputError, match=r"p\.npz\[text\]: row 5 contains NaN or Inf"):
        load_paired(paired)


def test_dimension_mismatch_inside_a_shard_and_between_inputs(tmp_path, rows, rng):
    folder = write_shard_folder(tmp_path / "dim", rows, override={7: np.zeros(D + 1, dtype=np.float16)})
    with pytest.raises(AuditInputError, match=r"shard-000000\.tar sample s000000-000007: emb\.npy has shape \(17,\), "
                                              r"expected \(16,\) \(dimension mismatch\)"):
        load_shard_folder(folder)
    shards = load_shard_folder(write_shard_folder(tmp_path / "ok", rows))
    np.save(tmp_path / "img32.npy", unit_rows(rng, 50, 32))
    images = load_images(tmp_path / "img32.npy")
    with pytest.raises(
        AuditInputError, match=r"dimension mismatch between inputs: images .*img32\.npy\) d=32, ok .* d=16"
    ):
        check_consistency([images, shards])
    np.savez(tmp_path / "p.npz", image=rows, text=unit_rows(rng, 350, 8))
    with pytest.raises(AuditInputError, match=r"p\.npz: dimension mismatch between image d=16 and text d=8"):
        load_paired(tmp_path / "p.npz")
    np.savez(tmp_path / "q.npz", image=rows, text=rows[:100])
    with pytest.raises(AuditInputError, match=r"q\.npz: paired arrays must have the same rows"):
        load_paired(tmp_path / "q.npz")


def test_different_clip_models_are_refused(tmp_path, rows):
    a = load_shard_folder(write_shard_folder(tmp_path / "a", rows, model=FP))
    b = load_shard_folder(write_shard_folder(tmp_path / "b", rows, model=OTHER_FP))
    with pytest.raises(AuditInputError, match=r"different CLIP models.*a \(.*'toy\|test.*b \(.*'ViT-B-32\|openai"):
        check_consistency([a, b])
    write_embeddings_npy(tmp_path / "img.npy", rows, model_fingerprint=OTHER_FP)
    images = load_images(tmp_path / "img.npy")
    with pytest.raises(AuditInputError, match=r"different CLIP models.*images \(.*img\.npy\): 'ViT-B-32"):
        check_consistency([images, a])
    np.save(tmp_path / "bare.npy", rows)
    d, fp, warnings = check_consistency([load_images(tmp_path / "bare.npy"), a])  # unknown model: accepted, warned
    assert (d, fp) == (D, FP) and "cannot be verified" in warnings[0]


def test_sample_encoded_by_another_model_inside_a_folder(tmp_path, rows):
    folder = write_shard_folder(tmp_path / "mixed", rows, sample_models={200: OTHER_FP})
    with pytest.raises(AuditInputError, match=r"s000002-000000: sample was encoded with CLIP model 'ViT-B-32"):
        load_shard_folder(folder)


def test_bad_sidecar_and_bad_arrays(tmp_path, rows):
    np.save(tmp_path / "img.npy", rows)
    (tmp_path / "img.json").write_text("[1, 2]")
    with pytest.raises(AuditInputError, match=r"img\.json: sidecar must be a JSON object"):
        load_images(tmp_path / "img.npy")
    np.save(tmp_path / "ints.npy", np.ones((4, 3), dtype=np.int64))
    with pytest.raises(AuditInputError, match=r"ints\.npy: unsupported dtype int64"):
        load_images(tmp_path / "ints.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(AuditInputError, match=r"junk\.npy: not a readable \.npy"):
        load_images(tmp_path / "junk.npy")
    with pytest.raises(AuditInputError, match=r"missing\.npy: image embeddings not found"):
        load_images(tmp_path / "missing.npy")
    np.savez(tmp_path / "p.npz", image=rows)
    with pytest.raises(
        AuditInputError, match=r"p\.npz: paired \.npz needs arrays 'image' and 'text'; missing \['text'\]"
    ):
        load_paired(tmp_path / "p.npz")


def test_manifest_that_disagrees_with_the_disk_or_its_totals_is_refused(folder):
    import shutil

    manifest = json.loads((folder / "manifest.json").read_text())
    # a manifest that lists fewer shards than the folder holds
    short = {**manifest, "shards": manifest["shards"][:3], "num_tasks": 3,
             "totals": {**manifest["totals"], "shards": 3, "samples": 300}}
    (folder / "manifest.json").write_text(json.dumps(short))
    with pytest.raises(
        AuditInputError, match=r"1 shard file\(s\) on disk are not in manifest\.json .*shard-000003\.tar"
    ):
        load_shard_folder(folder)
    # entries that disagree with totals
    (folder / "manifest.json").write_text(json.dumps({**manifest, "totals": {**manifest["totals"], "samples": 999}}))
    with pytest.raises(AuditInputError, match=r"totals say 999 samples but the shard entries add up to 350"):
        load_shard_folder(folder)
    # a complete run whose task count disagrees with its entries
    (folder / "manifest.json").write_text(json.dumps({**manifest, "num_tasks": 5}))
    with pytest.raises(AuditInputError, match=r"5 tasks lists 4 shards"):
        load_shard_folder(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_shard_folder(folder).n_total == 350
    shutil.copy(folder / "shard-000000.tar", folder / "shard-000009.tar")
    with pytest.raises(AuditInputError, match="shard-000009.tar"):
        load_shard_folder(folder)


def test_aligner_dir_follows_the_manifest(folder, tmp_path):
    got = load_shard_folder(folder)
    got.aligner = {"name": "identity", "dir": "aligner"}
    assert got.aligner_dir == folder / "aligner"
    got.aligner = {"name": "identity", "dir": str(tmp_path / "elsewhere" / "aligner")}  # made with --aligner-dir
    assert got.aligner_dir == tmp_path / "elsewhere" / "aligner"
    got.aligner = None
    assert got.aligner_dir == folder / "aligner"


def test_npy_folder_scanned_in_row_range_tasks_that_cross_files(tmp_path, rng):
    """300k rows in 13 files (one empty): three 131 072-row tasks, each opening only the files its rows lie
    in; rows, keys and moments equal a direct reading of the files."""
    from anisogen.audit.defaults import ROWS_PER_TASK
    from anisogen.audit.metrics import moments

    rows = unit_rows(rng, 300_000, 2).astype(np.float32)
    parts = tmp_path / "img_emb"
    parts.mkdir()
    sizes = [25_000] * 6 + [0] + [25_000] * 6
    start = 0
    for i, n in enumerate(sizes):
        write_embeddings_npy(parts / f"img_emb_{i}.npy", rows[start : start + n], model_fingerprint=FP)
        start += n
    assert start == 300_000 and -(-start // ROWS_PER_TASK) == 3
    got = load_images(parts, max_samples=1000, seed=4)
    positions = np.sort(np.random.default_rng(4).choice(300_000, 1000, replace=False))
    np.testing.assert_array_equal(got.emb, rows[positions])
    ends = np.cumsum(sizes)
    files = np.searchsorted(ends, positions, side="right")
    assert got.keys == [f"img_emb_{f}.npy:{p - (ends[f] - sizes[f])}" for f, p in zip(files, positions)]
    ref = moments(rows.astype(np.float64) / np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True))
    assert got.moments.count == got.n_total == 300_000
    np.testing.assert_allclose(got.moments.outer, ref.outer, rtol=1e-12)
