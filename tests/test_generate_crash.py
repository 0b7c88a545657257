"""Exactly-once under crashes: 2-process runs SIGKILLed between and inside shards, then resumed.

Process groups are forked from the test process (already warm, so each run takes seconds) and joined
through torch.distributed/gloo exactly as ``accelerate launch`` ranks are (RANK/WORLD_SIZE/MASTER_* env,
``accelerate.PartialState``). As torchrun does, when one rank dies the harness kills the others. The
kill itself is a real ``SIGKILL`` the rank sends itself at a chosen point (``ANISOGEN_FAULT``).
test_generate_launch.py does the same through the real ``accelerate launch`` CLI.
"""

import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_utils import make_config, manifest_core, shard_bytes, write_corpus, write_images  # noqa: E402

from anisogen.generate import GenerateConfig, generate  # noqa: E402
from anisogen.shards import IncompleteRunError, iter_samples, load_manifest, verify_folder, writer  # noqa: E402
from anisogen.shards.schema import make_key  # noqa: E402

SPS = 10  # 240 rows -> 24 tasks: rank 0 gets the even ones, rank 1 the odd ones


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(cfg_dict, rank, world, port, fault):
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if fault:
            os.environ["ANISOGEN_FAULT"] = fault
        else:
            os.environ.pop("ANISOGEN_FAULT", None)
        from accelerate.state import PartialState

        PartialState._reset_state()
        torch.set_num_threads(1)
        generate(GenerateConfig(**cfg_dict))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_group(cfg: GenerateConfig, world: int = 2, fault: str | None = None, timeout: float = 180) -> list[int]:
    """Run ``generate(cfg)`` as ``world`` forked ranks; returns their exit codes (-9 = SIGKILL)."""
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(asdict(cfg), r, world, port, fault)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):  # torchrun-like teardown of the survivors
            for p in procs:
                if p.exitcode is None:
                    os.kill(p.pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            for p in procs:
                if p.exitcode is None:
                    os.kill(p.pid, signal.SIGKILL)
            raise TimeoutError("process group did not finish")
        time.sleep(0.05)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    expected = write_corpus(tmp / "corpus.jsonl")
    write_images(tmp / "img.npy")
    ref = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="ref", samples_per_shard=SPS)
    torch.set_num_threads(1)
    generate(ref)  # uninterrupted single-process reference
    return tmp, expected


def _published_are_intact(out: Path) -> int:
    """Every record's tar exists with matching sha256; returns the number of published shards."""
    recs = writer.list_records(out)
    for task, rec in recs.items():
        assert writer.check_published(out, task, remove_invalid=False) is not None, task
    return len(recs)


def test_two_process_output_equals_one_process(setup):
    tmp, _ = setup
    cfg = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="two", samples_per_shard=SPS)
    assert run_group(cfg) == [0, 0]
    assert shard_bytes(tmp / "two") == shard_bytes(tmp / "ref")
    assert manifest_core(tmp / "two") == manifest_core(tmp / "ref")
    assert (tmp / "two" / "aligner" / "tensors.safetensors").read_bytes() == (
        tmp / "ref" / "aligner" / "tensors.safetensors").read_bytes()
    assert load_manifest(tmp / "two")["last_run"]["world_size"] == 2


def test_sigkill_at_several_points_then_resume_is_exactly_once(setup):
    tmp, expected = setup
    out = tmp / "killed"
    cfg = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="killed", samples_per_shard=SPS)
    published = []
    # inside a shard (temp tar half written), after a shard's rename but before its record,
    # with the temp tar complete but not renamed, and between shards
    # (no rank given: each rank dies at its own first such event, whichever comes first)
    for fault in ("mid_tar:1", "after_rename:1", "before_rename:2", "after_record:1"):
        codes = run_group(cfg, fault=fault)
        assert -signal.SIGKILL in codes and codes != [0, 0], (fault, codes)
        with pytest.raises(IncompleteRunError):
            load_manifest(out)
        published.append(_published_are_intact(out))
    assert published[-1] < 24 and published == sorted(published)
    assert run_group(cfg) == [0, 0]
    # exactly once: union of keys == input minus rejects, no duplicates, bytes == uninterrupted run
    assert verify_folder(out)["samples"] == 240 - len(expected)
    keys = [s["key"] for s in iter_samples(out)]
    assert keys == [make_key(r // SPS, r % SPS) for r in range(240) if r not in expected]
    assert len(set(keys)) == len(keys)
    assert shard_bytes(out) == shard_bytes(tmp / "ref")
    assert manifest_core(out) == manifest_core(tmp / "ref")
    assert not list(out.glob("*.tmp")) and not list((out / "records").glob("*.tmp"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["shards"]) == 24


def test_kill_during_fit_pass_then_resume(setup, monkeypatch):
    from anisogen.generate import run as run_mod

    tmp, _ = setup
    monkeypatch.setattr(run_mod, "FIT_CHUNK", 32)  # 200 sampled rows -> 7 fit chunks over 2 ranks
    kw = dict(samples_per_shard=SPS, fit_samples=200)
    ref = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="fitref", **kw)
    assert run_group(ref) == [0, 0]
    cfg = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="fitkill", **kw)
    codes = run_group(cfg, fault="fit_chunk:2:1")  # rank 1 dies after its 2nd fit chunk
    assert -signal.SIGKILL in codes
    out = tmp / "fitkill"
    assert not (out / "aligner").exists() and not list(out.glob("shard-*.tar"))
    assert len(list((out / "fit").glob("text-*.npy"))) >= 2
    assert run_group(cfg) == [0, 0]
    assert (out / "aligner" / "tensors.safetensors").read_bytes() == (
        tmp / "fitref" / "aligner" / "tensors.safetensors").read_bytes()
    assert shard_bytes(out) == shard_bytes(tmp / "fitref")
    assert not (out / "fit").exists()


def _kill_with_queued_shards(cfg_dict):
    """One process whose writer is slowed down (10 ms per sample) and which SIGKILLs itself as soon as
    the main thread hands a shard to the writer while another one is still waiting (``queued``)."""
    def on_event(event: str) -> None:
        if event == "sample":
            time.sleep(0.01)
        elif event == "queued":
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ANISOGEN_FAULT"):
            os.environ.pop(k, None)
        from accelerate.state import PartialState

        PartialState._reset_state()
        torch.set_num_threads(1)
        generate(GenerateConfig(**cfg_dict), on_event=on_event)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_sigkill_with_shards_queued_for_the_writer_then_resume(setup):
    tmp, expected = setup
    out = tmp / "queued"
    cfg = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy", out="queued", samples_per_shard=SPS)
    proc = mp.get_context("fork").Process(target=_kill_with_queued_shards, args=(asdict(cfg),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    published = _published_are_intact(out)
    assert published < 24  # the shards still in the writer's queue were lost with the process
    with pytest.raises(IncompleteRunError):
        load_manifest(out)
    s = generate(cfg)
    assert s["status"] == "complete" and s["this_run"]["shards"] == 24 - published
    keys = [k["key"] for k in iter_samples(out)]
    assert keys == [make_key(r // SPS, r % SPS) for r in range(240) if r not in expected]
    assert shard_bytes(out) == shard_bytes(tmp / "ref")
    assert manifest_core(out) == manifest_core(tmp / "ref")
    assert not list(out.glob("*.tmp")) and not list((out / "records").glob("*.tmp"))
