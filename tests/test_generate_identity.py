"""Content identity of generate's inputs: cheap per file (a bounded number of bytes read, whatever the file
size), content-based (``touch`` keeps it, an edit in a sampled window changes it), and computed by the main
process only, then shared with the other ranks (:meth:`anisogen.generate.run.Dist.from_main`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anisogen.encode.images import describe_image_source
from anisogen.fileid import LISTING_WINDOW, WINDOW, file_identity, read_window, sample_sha256
from anisogen.generate.run import Dist


def _write_tars(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img-{i:04d}.tar"
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths.append(p)
    return paths


def _touch_later(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns + 10**10, st.st_mtime_ns + 10**10))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("offset", ["head", "tail"])
def test_touch_keeps_identity_an_edit_in_head_or_tail_changes_it(tmp_path, offset):
    paths = _write_tars(tmp_path / "shards", 3, 5 * LISTING_WINDOW)
    before = describe_image_source(tmp_path / "shards")
    assert before["kind"] == "shards" and before["files"] == 3
    for p in paths:
        _touch_later(p)
    assert describe_image_source(tmp_path / "shards") == before
    _flip(paths[1], 10 if offset == "head" else 5 * LISTING_WINDOW - 10)
    assert describe_image_source(tmp_path / "shards")["listing_sha256"] != before["listing_sha256"]


def test_npy_source_touch_and_edit(tmp_path):
    p = tmp_path / "img.npy"
    np.save(p, np.ones((10, 4), np.float32))
    before = describe_image_source(p)
    _touch_later(p)
    assert describe_image_source(p) == before
    np.save(p, np.full((10, 4), 2, np.float32))  # same size, other bytes
    assert describe_image_source(p)["listing_sha256"] != before["listing_sha256"]


def test_identity_reads_a_bounded_number_of_bytes_per_file(tmp_path):
    n = 40
    _write_tars(tmp_path / "shards", n, 20 * LISTING_WINDOW)  # 1.25 MiB each: the old 3 MiB windows read it all
    asked: list[int] = []
    got: list[int] = []

    def spy(f, offset, length):
        asked.append(length)
        data = read_window(f, offset, length)
        got.append(len(data))
        return data

    ident = describe_image_source(tmp_path / "shards", read=spy)
    assert ident == describe_image_source(tmp_path / "shards")  # the spy changes nothing
    assert sum(got) <= n * 3 * LISTING_WINDOW and max(asked) <= LISTING_WINDOW
    assert len(asked) <= 3 * n


def test_corpus_identity_keeps_its_one_mib_windows(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(b"x" * (4 * WINDOW))
    calls: list[int] = []

    def spy(f, offset, length):
        calls.append(length)
        return read_window(f, offset, length)

    assert file_identity(p)["sample_sha256"] == sample_sha256(p, read=spy)
    assert calls == [WINDOW] * 3


# ------------------------------------------------------------------------------- main-only, shared
def _from_main_worker(rank: int, init: str, out_dir: str) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        dist = Dist(SimpleNamespace(device=torch.device("cpu")), rank, 2, rank, 2, torch.device("cpu"))
        calls = []

        def compute():
            calls.append(rank)
            return {"listing": [1, 2, 3], "by": rank}

        value = dist.from_main(compute)

        def fail():
            raise FileNotFoundError("image source 'x' does not exist")

        try:
            dist.from_main(fail)
            err = None
        except FileNotFoundError as exc:
            err = str(exc)
        Path(out_dir, f"{rank}.json").write_text(json.dumps([value, calls, err]))
    finally:
        td.destroy_process_group()


def test_from_main_computes_once_and_shares_result_and_errors(tmp_path):
    import torch.multiprocessing as mp

    init = "file://" + os.path.join(tempfile.mkdtemp(dir=tmp_path), "store")
    mp.spawn(_from_main_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    main = json.loads((tmp_path / "0.json").read_text())
    other = json.loads((tmp_path / "1.json").read_text())
    assert main == [{"listing": [1, 2, 3], "by": 0}, [0], "image source 'x' does not exist"]
    assert other == [{"listing": [1, 2, 3], "by": 0}, [], "image source 'x' does not exist"]


def test_from_main_single_process_just_computes():
    dist = Dist(None, 0, 1, 0, 1, torch.device("cpu"))
    assert dist.from_main(lambda: 7) == 7
