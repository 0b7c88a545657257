"""The trainer lists tar members (key counts, the stage-2 store's index) through the shards package's ustar
walker (``anisogen.shards.reader.shard_members``), with its own error type naming the file."""

from __future__ import annotations

import io
import tarfile

import pytest

from anisogen.shards.reader import shard_members
from anisogen.train.data.common import SampleError
from anisogen.train.data.shard_stream import _count_tar_samples, tar_members
from anisogen.train.synthetic import make_items, write_caption_shards


@pytest.fixture()
def shard(tmp_path):
    write_caption_shards(tmp_path, make_items(12, d=8), samples_per_shard=12)
    return tmp_path / "shard-000000.tar"


def test_members_match_tarfile_listing(shard):
    with tarfile.open(shard) as tf:
        want = [(m.name.split(".", 1)[0], m.name.split(".", 1)[1], m.offset_data, m.size) for m in tf if m.isreg()]
    assert tar_members(str(shard)) == shard_members(shard) == want
    assert _count_tar_samples(str(shard)) == 12


def _pax_tar() -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("a.txt")
        ti.size, ti.mtime = 3, 1.5  # a float mtime makes tarfile write a pax header
        tf.addfile(ti, io.BytesIO(b"abc"))
    return bio.getvalue()


@pytest.mark.parametrize("name,make,match", [
    ("truncated", lambda data: data[:3000], r"truncated or not a tar\): .*truncated tar"),
    ("junk", lambda data: b"not a tar" * 100, r"truncated or not a tar\): .*bad size field"),
    ("zeros", lambda data: b"\x00garbage" * 300, r"truncated or not a tar\): .*empty name"),
    ("empty", lambda data: b"", r"truncated or not a tar\): .*empty file"),
    ("no-members", lambda data: b"\0" * 1024, r"holds no samples"),
    ("pax", lambda data: _pax_tar(), r"unsupported tar member type: pax"),
])
def test_bad_tars_raise_sample_error_naming_the_file(shard, tmp_path, name, make, match):
    bad = tmp_path / f"{name}.tar"
    bad.write_bytes(make(shard.read_bytes()))
    with pytest.raises(SampleError, match=rf"{name}\.tar.*{match}"):
        tar_members(str(bad))
    with pytest.raises(SampleError, match=rf"{name}\.tar"):
        _count_tar_samples(str(bad))


def test_missing_file(tmp_path):
    with pytest.raises(SampleError, match=r"missing shard file .*nope\.tar"):
        tar_members(str(tmp_path / "nope.tar"))
