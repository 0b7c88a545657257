"""The generator's parts around the task function: the device storage cast, the background writer, the
fault seam, and the executor modules' independence from the orchestration module."""

import ast
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anisogen.generate.background import BackgroundWriter
from anisogen.generate.faults import FAULT_POINTS, FaultInjector
from anisogen.shards.device import encode_embedding_torch, host_view
from anisogen.shards.schema import encode_embedding, npy_bytes


def _nasty_floats(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 33)).astype(np.float32)
    x[0, :8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 65504.0, 70000.0]  # nan, infs, zeros, subnormal, fp16 max+
    x[1] = rng.uniform(-1, 1, 33).astype(np.float32) * 1e-5  # fp16 subnormals
    bits = x[2].view(np.uint32)
    bits[:] = (bits & 0xFFFF0000) | 0x8000  # exact bf16 ties: round-to-even decides
    return x


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 70000 -> inf in fp16, on purpose
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_device_storage_cast_gives_the_numpy_bits(dtype):
    x = _nasty_floats()
    want = encode_embedding(x, dtype)
    got = host_view(encode_embedding_torch(torch.from_numpy(x), dtype).cpu(), dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    assert npy_bytes(got[3]) == npy_bytes(want[3])  # what lands in emb.npy


def test_device_storage_cast_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="unknown embedding dtype 'fp8'"):
        encode_embedding_torch(torch.zeros(2, 2), "fp8")


def test_background_writer_keeps_order_and_bounds_the_queue():
    started, release = [], threading.Event()

    def write(item):
        started.append(item)
        release.wait(5)
        return {"task": item}

    bg = BackgroundWriter(write, max_queued=2)
    for i in range(3):  # one being written + two waiting
        bg.submit(i)
    assert bg.backlog == 3
    blocked = threading.Thread(target=bg.submit, args=(3,))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # the fourth waits for room
    release.set()
    blocked.join(5)
    recs = bg.close()
    assert [r["task"] for r in recs] == [0, 1, 2, 3] and started == [0, 1, 2, 3] and bg.backlog == 0


def test_background_writer_error_reaches_the_main_thread():
    def write(item):
        if item == 1:
            raise OSError("disk full")
        return {"task": item}

    bg = BackgroundWriter(write, max_queued=1)
    bg.submit(0)
    bg.submit(1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(2, 50):
            bg.submit(i)
            time.sleep(0.01)
    bg.abort()


def test_background_writer_abort_drops_queued_items():
    gate = threading.Event()
    done = []

    def write(item):
        gate.wait(5)
        done.append(item)
        return {"task": item}

    bg = BackgroundWriter(write, max_queued=3)
    for i in range(3):
        bg.submit(i)
    threading.Timer(0.2, gate.set).start()
    bg.abort()
    assert done == [0]  # the item being written finishes; the queued ones are never written


def test_fault_injector_parses_and_counts(monkeypatch):
    assert not FaultInjector("").active
    with pytest.raises(ValueError, match="POINT:N"):
        FaultInjector("nowhere:1")
    inj = FaultInjector("after_record:3:1", rank=0)
    assert not inj.active  # another rank's fault
    killed = []
    monkeypatch.setattr("os.kill", lambda pid, sig: killed.append(sig))
    inj = FaultInjector("mid_tar:2", rank=0)
    for _ in range(3):
        inj("sample")  # shard 1: the 2nd sample is the 1st mid_tar
    inj("before_rename")
    assert killed == []
    inj("sample")
    inj("sample")  # shard 2: 2nd mid_tar -> kill
    assert len(killed) == 1
    assert set(FAULT_POINTS) >= {"queued", "fit_chunk", "after_record"}


def test_executors_import_nothing_from_the_orchestration_module():
    root = Path(__file__).resolve().parents[1] / "anisogen" / "generate"
    for path in sorted((root / "executors").glob("*.py")) + [root / "task.py", root / "context.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").endswith("run") and (node.module or "") != "run", (path, node.module)


def test_map_async_flags_bad_rows_without_raising_and_the_writer_refuses_them():
    from anisogen.align import fit_aligner
    from anisogen.encode.text import Tokenized
    from anisogen.generate.task import Prepared, Task, _refuse_bad_rows

    rng = np.random.default_rng(0)
    text = rng.standard_normal((200, 16)) + 1.0
    image = rng.standard_normal((200, 16)) - 1.0
    dt = fit_aligner("realign", text=text, image=image, normalize=True).device_transform("cpu")
    x = torch.nn.functional.normalize(torch.from_numpy(text[:5]).float(), dim=1)
    x[3, 0] = float("nan")
    out, bad = dt.map_async(x)
    assert bad.tolist() == [False, False, False, True, False]
    good = torch.tensor([0, 1, 2, 4])
    assert torch.equal(out[good], dt(x[good]))  # same bits as the checked call (fixed-shape blocks)
    with pytest.raises(ValueError, match="text row 3 contains NaN"):
        dt(x)
    tok = Tokenized(np.zeros((5, 4), np.int64), np.full(5, 3), np.zeros(5, bool))
    prep = Prepared(Task(7, 700, 705), ["t"] * 5, [f"doc{i}" for i in range(5)], np.arange(700, 705), tok, [])
    with pytest.raises(ValueError, match=r"task 7: row 703 \(id 'doc3'\).*1 such row"):
        _refuse_bad_rows(prep, "realign", bad.numpy())
