"""Orchestration of a generation run: resume checks, dedup scan, fit-then-generate, executors, summary.

Stages (every process runs the same code; "main" = local process 0 of the accelerate group):

1. **open**: load the CLIP model (:func:`anisogen.encode.load_clip`), open the corpus (main first, so the
   Arrow cache is built once), resolve the config and its fingerprint.
2. **resume check**: every process compares the fingerprint with ``manifest.json``; a different one is
   refused (:class:`ConfigMismatch`) unless ``overwrite``, which deletes the previous outputs. Main then
   writes a ``"running"`` manifest and removes stray temp files. Barrier.
3. **dedup** (optional): main scans the corpus once for exact duplicates -> ``dedup.npz``. Barrier.
4. **aligner**: ``--aligner-dir`` is loaded (model fingerprint checked); otherwise an existing
   ``OUT/aligner`` from an earlier attempt of this run is reused; otherwise it is fitted: the seeded fit
   sample is cut into fixed chunks, chunk j encoded by process ``j % world`` into ``OUT/fit/``, barrier,
   main gathers the chunks in order, embeds/loads the images, fits, saves ``OUT/aligner`` atomically,
   barrier, and every process loads the saved artifact. Gathering the sample (instead of all-reducing
   moments) makes the aligner bit-identical for any number of processes and also serves aligners that
   train on the sample itself (AnisoAlign).
5. **generate**: the tasks of this process (``rank::world``) not already published are prepared in
   DataLoader workers and finished (encode, align, write, record) in the main thread.
6. **finalize**: barrier; main assembles ``rejects.jsonl``, ``sizes.json`` and a ``"complete"``
   manifest once every task has a record (with Slurm arrays the last worker to finish does it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..encode.corpus import Corpus, Record, Reject, find_duplicates, sample_rows
from ..encode.text import ClipTokenizer, TextEncoder
from ..shards import writer
from ..shards.schema import (
    ALIGNER_DIRNAME, MANIFEST_NAME, RECORDS_DIRNAME, REJECTS_NAME, SHARD_GLOB, SIZES_NAME, fingerprint, npy_bytes,
)
from .config import GenerateConfig
from .task import fault, Prepared, Task, TaskInputs, TaskOutputs, assign, finish_task, plan_tasks, prepare_records, prepare_task

logger = logging.getLogger("anisogen.generate")

DEDUP_NAME = "dedup.npz"
FIT_DIRNAME = "fit"
FIT_CHUNK = 4096


class ConfigMismatch(RuntimeError):
    """The output folder holds a run with a different config fingerprint."""


# ------------------------------------------------------------------------------------ processes
@dataclass
class Dist:
    """The process group as the generator sees it (wraps ``accelerate.PartialState``).

    ``rank``/``world`` are global over Slurm-array workers too: ``rank = worker_index * group + local``.
    """

    state: Any
    rank: int
    world: int
    group_rank: int
    group_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.group_rank == 0

    def barrier(self) -> None:
        if self.group_world > 1:
            self.state.wait_for_everyone()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        if self.group_world == 1:
            return np.asarray(values, dtype=np.float64)
        import torch.distributed as td

        t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.state.device)
        td.all_reduce(t)
        return t.cpu().numpy()

    @contextmanager
    def main_first(self):
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    @classmethod
    def from_accelerate(cls, cfg: GenerateConfig) -> "Dist":
        from accelerate import PartialState

        want_cpu = (cfg.device is not None and cfg.device.startswith("cpu")) or not torch.cuda.is_available()
        state = PartialState(cpu=want_cpu)
        device = torch.device(cfg.device) if cfg.device and not want_cpu else state.device
        if want_cpu:
            device = torch.device("cpu")
        g, gw = state.process_index, state.num_processes
        return cls(state, cfg.worker_index * gw + g, cfg.num_workers * gw, g, gw, device)


# ------------------------------------------------------------------------------------- helpers
def _set_threads(cfg: GenerateConfig, dist: Dist) -> int:
    if cfg.threads:
        n = cfg.threads
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.group_world))
        n = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)
    return n


def _dir_digest(directory: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(p.name for p in directory.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update(writer.file_sha256(directory / name).encode())
    return h.hexdigest()


def resolve(cfg: GenerateConfig, corpus: Corpus, model_fingerprint: str, encoder: TextEncoder) -> dict[str, Any]:
    """The fingerprinted, resolved config: output-affecting flags + what they point to."""
    from ..encode.images import describe_image_source

    out = cfg.output_config()
    out.pop("corpus")
    out["corpus_resolved"] = corpus.describe()
    out["corpus_kind"] = corpus.kind
    out["model_fingerprint"] = model_fingerprint
    out["precision"] = encoder.precision
    out["device_type"] = encoder.device.type
    out["trimmed"] = encoder.trimmed
    out["pad_multiple"] = encoder.pad_multiple
    out.pop("images")
    out.pop("aligner_dir")
    if cfg.images:
        out["images_resolved"] = describe_image_source(cfg.images)
    if cfg.aligner_dir:
        out["aligner_dir_sha256"] = _dir_digest(Path(cfg.aligner_dir))
    return out


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _clear_outputs(out: Path, keep_aligner: bool) -> None:
    for p in out.glob(SHARD_GLOB):
        p.unlink()
    for name in (MANIFEST_NAME, SIZES_NAME, REJECTS_NAME, DEDUP_NAME):
        (out / name).unlink(missing_ok=True)
    for d in (RECORDS_DIRNAME, FIT_DIRNAME) + (() if keep_aligner else (ALIGNER_DIRNAME,)):
        shutil.rmtree(out / d, ignore_errors=True)
    writer.remove_temps(out)


def check_resume(cfg: GenerateConfig, out: Path, resolved: dict) -> str:
    """``"fresh"``, ``"resume"`` or ``"overwrite"``; raises :class:`ConfigMismatch` (read-only check)."""
    fp = fingerprint(resolved)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        if cfg.overwrite:
            return "overwrite"
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("config_fingerprint") == fp:
            return "resume"
        diff = _config_diff(old.get("config", {}), resolved)
        raise ConfigMismatch(
            f"{out} holds a run with a different config (fingerprint {str(old.get('config_fingerprint'))[:12]} vs "
            f"{fp[:12]}); changed: " + "; ".join(diff[:8]) + ". Use the original flags to resume, a new --out, "
            "or --overwrite to discard the previous outputs.")
    stray = list(out.glob(SHARD_GLOB)) + list((out / RECORDS_DIRNAME).glob("*.json"))
    if stray and not cfg.overwrite:
        raise ConfigMismatch(f"{out} holds shard files but no {MANIFEST_NAME}; refusing to mix outputs "
                             "(use --overwrite or a new --out)")
    return "overwrite" if stray else "fresh"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    writer.atomic_write_bytes(path, buf.getvalue())


def load_duplicates(out: Path) -> dict[int, int]:
    path = out / DEDUP_NAME
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return dict(zip(z["rows"].tolist(), z["first"].tolist()))


# ---------------------------------------------------------------------------------- aligner fit
def fit_or_load_aligner(cfg: GenerateConfig, dist: Dist, out: Path, corpus: Corpus, encoder: TextEncoder,
                        model, preprocess, model_fingerprint: str, *, progress: bool) -> Any:
    """Stage 4 (see module docstring). Returns the aligner every process loaded from disk."""
    from ..align import fit_aligner, load_aligner

    if cfg.aligner_dir:
        return load_aligner(cfg.aligner_dir, model_fingerprint=model_fingerprint)
    art = out / ALIGNER_DIRNAME
    if (art / "config.json").is_file():
        return load_aligner(art, model_fingerprint=model_fingerprint)
    rows = sample_rows(corpus.num_rows, cfg.fit_samples, cfg.seed, corpus)
    chunks = [rows[i : i + FIT_CHUNK] for i in range(0, len(rows), FIT_CHUNK)]
    fit_dir = out / FIT_DIRNAME
    fit_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for j in range(dist.group_rank, len(chunks), dist.group_world):
        path = fit_dir / f"text-{j:05d}.npy"
        if path.is_file():
            continue
        recs = [r for r in corpus.records_at(chunks[j]) if isinstance(r, Record)]
        tok = encoder.tokenize([r.text for r in recs])
        emb = encoder.encode_tokenized(tok)
        writer.atomic_write_bytes(path, npy_bytes(emb.astype(np.float32)))
        fault("fit_chunk")
    dist.barrier()
    if dist.is_main and not (art / "config.json").is_file():
        parts = [np.load(fit_dir / f"text-{j:05d}.npy", allow_pickle=False) for j in range(len(chunks))]
        text = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
        if len(text) == 0:
            raise ValueError("the fit sample holds no valid texts (every sampled record was rejected)")
        from ..encode.images import load_image_embeddings

        image = load_image_embeddings(cfg.images, model=model, preprocess=preprocess,
                                      model_fingerprint=model_fingerprint, device=encoder.device,
                                      limit=cfg.fit_images, num_workers=min(cfg.workers, 4), progress=progress)
        if image.shape[1] != text.shape[1]:
            raise ValueError(f"--images {cfg.images}: image embeddings have d={image.shape[1]}, "
                             f"the text embeddings d={text.shape[1]} (another model?)")
        enc_s = time.perf_counter() - t0
        aligner = fit_aligner(cfg.aligner, text=text.astype(np.float64), image=image.astype(np.float64),
                              seed=cfg.seed, model_fingerprint=model_fingerprint,
                              device=str(encoder.device), progress=progress, **cfg.aligner_params)
        tmp = writer.temp_path(art)
        aligner.save(tmp)
        try:
            os.rename(tmp, art)
        except OSError:  # another worker published it first (fitting is deterministic): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        writer.fsync_dir(out)
        shutil.rmtree(fit_dir, ignore_errors=True)
        logger.info("fitted aligner %s on %d texts + %d images (%.1fs encoding, %.1fs total)", cfg.aligner,
                    len(text), len(image), enc_s, time.perf_counter() - t0)
    dist.barrier()
    return load_aligner(art, model_fingerprint=model_fingerprint)


# ----------------------------------------------------------------------------------- executors
class _TaskData(torch.utils.data.Dataset):
    """Map-style dataset over pending tasks; item = :class:`Prepared` (made in a DataLoader worker)."""

    def __init__(self, inputs: TaskInputs, tasks: list[Task]):
        self.inputs, self.tasks = inputs, tasks

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i):
        return prepare_task(self.inputs, self.tasks[i])


class _StreamTaskData(torch.utils.data.IterableDataset):
    """Streaming corpora: read sequentially, cut into tasks, prepare this process's pending ones.

    Yields :class:`Prepared` items and finally ``("end", num_rows)``.
    """

    def __init__(self, inputs: TaskInputs, sps: int, rank: int, world: int, out: str, verify: str):
        self.inputs, self.sps, self.rank, self.world, self.out, self.verify = inputs, sps, rank, world, out, verify

    def __iter__(self):
        buf: list = []
        n = 0
        task_index = 0
        for rec in self.inputs.corpus.records():
            n += 1
            buf.append(rec)
            if len(buf) == self.sps:
                yield from self._emit(task_index, buf)
                task_index += 1
                buf = []
        if buf:
            yield from self._emit(task_index, buf)
        yield ("end", n)

    def _emit(self, index: int, recs: list):
        if index % self.world != self.rank:
            return
        if writer.check_published(self.out, index, verify=self.verify) is not None:
            return
        writer.remove_temps(self.out, index)
        start = index * self.sps
        yield prepare_records(self.inputs, Task(index, start, start + len(recs)), iter(recs))


def _first(batch):
    return batch[0]


class _Progress:
    """Main-process tqdm over input rows, advanced from the completion records of all processes."""

    def __init__(self, enabled: bool, total: int | None, out: Path, sps: int):
        self.bar = None
        self.out, self.sps, self.last = out, sps, 0.0
        self.extra: dict | None = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="generate", smoothing=0.1)

    def update(self, force: bool = False, extra: dict | None = None) -> None:
        if self.bar is None:
            return
        if extra:
            self.extra = extra
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        done = len(list((self.out / RECORDS_DIRNAME).glob("shard-*.json"))) * self.sps
        if self.bar.total is not None:
            done = min(done, self.bar.total)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if self.extra:
            self.bar.set_postfix(self.extra, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()


def run_accelerate(cfg: GenerateConfig, dist: Dist, out: Path, inputs: TaskInputs, outputs: TaskOutputs,
                   tasks: list[Task] | None, on_record: Callable[[dict], None]) -> int | None:
    """Default executor: this process's tasks through a DataLoader (CPU half in workers).

    ``tasks=None`` means a streaming corpus (tasks are discovered while reading). Returns the number of
    input rows for streaming corpora, else ``None``.
    """
    if tasks is not None:
        mine = assign(tasks, dist.rank, dist.world)
        pending = []
        for t in mine:
            if writer.check_published(out, t.index, verify=cfg.verify) is None:
                writer.remove_temps(out, t.index)
                pending.append(t)
        ds: torch.utils.data.Dataset = _TaskData(inputs, pending)
        workers = cfg.workers if pending else 0
    else:
        ds = _StreamTaskData(inputs, cfg.samples_per_shard, dist.rank, dist.world, str(out), cfg.verify)
        workers = min(cfg.workers, 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=_first, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    total_rows = None
    for item in loader:
        if isinstance(item, tuple):
            total_rows = int(item[1])
            continue
        on_record(finish_task(outputs, item))
    return total_rows


def run_ray(cfg: GenerateConfig, out: Path, tasks: list[Task], header: dict, on_record: Callable[[dict], None]) -> None:
    """``--executor ray``: one Ray task per pending shard, retried on failure, same task function."""
    from .ray_executor import run_ray_tasks

    pending = [t for t in tasks if writer.check_published(out, t.index, verify=cfg.verify) is None]
    run_ray_tasks(cfg, pending, header["model_fingerprint"], on_record)


# ------------------------------------------------------------------------------------ contexts
def build_context(cfg: GenerateConfig, device: torch.device, *, out: Path, model_bundle=None, aligner=None):
    """Everything the task function needs: ``(inputs, outputs, model, preprocess, fingerprint, corpus)``.

    Loads what is not given: the model (:func:`load_clip`), the aligner (``--aligner-dir`` or
    ``OUT/aligner``) and the duplicate map (``OUT/dedup.npz``). Used by every executor's workers.
    """
    from ..encode.clip import load_clip

    if model_bundle is None:
        model_bundle = load_clip(cfg.model, cfg.pretrained, device=device)
    model, preprocess, tokenizer = model_bundle
    fp = model.anisogen_fingerprint
    corpus = Corpus(cfg.corpus, text_field=cfg.text_field, id_field=cfg.id_field, limit=cfg.limit,
                    streaming=cfg.streaming, split=cfg.split, hub_config=cfg.hub_config, cache_dir=cfg.cache_dir)
    encoder = TextEncoder(model, tokenizer, device=device, batch_size=cfg.batch_size, bucket_window=cfg.bucket_window,
                          precision=cfg.precision, compile=cfg.compile, pad_multiple=cfg.pad_multiple)
    if aligner is None:
        from ..align import load_aligner

        aligner = load_aligner(cfg.aligner_dir or out / ALIGNER_DIRNAME, model_fingerprint=fp)
    inputs = TaskInputs(corpus, encoder.tokenizer, load_duplicates(out))
    outputs = TaskOutputs(str(out), encoder, aligner, fp, cfg.dtype, cfg.keep_source)
    return inputs, outputs, model, preprocess, fp, corpus


# ---------------------------------------------------------------------------------------- main
def generate(cfg: GenerateConfig, *, dist: Dist | None = None) -> dict[str, Any]:
    """Run (or resume) a generation; returns the summary dict (also printed on the main process)."""
    from ..encode.clip import load_clip

    cfg.validate()
    t_start = time.perf_counter()
    dist = dist or Dist.from_accelerate(cfg)
    threads = _set_threads(cfg, dist)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = cfg.progress and dist.is_main

    bundle = load_clip(cfg.model, cfg.pretrained, device=dist.device)
    model, preprocess, _ = bundle
    fp = model.anisogen_fingerprint
    # open the corpus on main first: builds the Arrow cache once
    encoder = TextEncoder(model, bundle[2], device=dist.device, batch_size=cfg.batch_size,
                          bucket_window=cfg.bucket_window, precision=cfg.precision, compile=cfg.compile,
                          pad_multiple=cfg.pad_multiple)
    corpus = Corpus(cfg.corpus, text_field=cfg.text_field, id_field=cfg.id_field, limit=cfg.limit,
                    streaming=cfg.streaming, split=cfg.split, hub_config=cfg.hub_config, cache_dir=cfg.cache_dir)
    with dist.main_first():
        corpus.dataset()
        corpus.check_fields()
    if cfg.executor == "ray" and corpus.streaming:
        raise ValueError("--executor ray needs random access to the corpus: use local files without --streaming")
    resolved = resolve(cfg, corpus, fp, encoder)
    config_fp = fingerprint(resolved)

    # -- resume check (read-only everywhere), then main mutates -------------------------------------
    mode = check_resume(cfg, out, resolved)
    dist.barrier()
    num_rows = corpus.num_rows
    header = {
        "config": resolved, "config_fingerprint": config_fp, "model_fingerprint": fp,
        "aligner": {"name": cfg.aligner, "fingerprint": None}, "dim": encoder.embed_dim, "dtype": cfg.dtype,
        "keep_source": cfg.keep_source, "samples_per_shard": cfg.samples_per_shard,
        "num_tasks": None if num_rows is None else -(-num_rows // cfg.samples_per_shard),
        "input_rows": num_rows,
    }
    if dist.is_main:
        if mode == "overwrite":
            _clear_outputs(out, keep_aligner=False)
        if cfg.num_workers == 1:
            writer.remove_temps(out)
        if mode != "resume" or not (out / MANIFEST_NAME).is_file():
            writer.assemble(out, header, writer.list_records(out), complete=False)
    dist.barrier()

    # -- dedup scan ---------------------------------------------------------------------------------
    if cfg.dedup:
        if dist.is_main and not (out / DEDUP_NAME).is_file():
            rows, first = find_duplicates(corpus, progress=progress)
            _save_npz(out / DEDUP_NAME, rows=rows, first=first)
        dist.barrier()

    # -- aligner ------------------------------------------------------------------------------------
    t_fit = time.perf_counter()
    aligner = fit_or_load_aligner(cfg, dist, out, corpus, encoder, model, preprocess, fp, progress=progress)
    fit_s = time.perf_counter() - t_fit
    aligner_dir = Path(cfg.aligner_dir) if cfg.aligner_dir else out / ALIGNER_DIRNAME
    header["aligner"] = {"name": aligner.name, "fingerprint": _dir_digest(aligner_dir),
                         "dir": ALIGNER_DIRNAME if not cfg.aligner_dir else os.path.abspath(cfg.aligner_dir),
                         "params": aligner.params}
    if cfg.fit_only:
        if dist.is_main:
            writer.assemble(out, header, writer.list_records(out), complete=False)
            print(f"[anisogen] aligner {aligner.name} ready in {aligner_dir} ({fit_s:.1f}s); "
                  "rerun without --fit-only to generate", flush=True)
        return {"fit_only": True, "aligner_dir": str(aligner_dir), "fit_s": fit_s}

    inputs = TaskInputs(corpus, encoder.tokenizer, load_duplicates(out))
    outputs = TaskOutputs(str(out), encoder, aligner, fp, cfg.dtype, cfg.keep_source)

    # -- generate -------------------------------------------------------------------------------------
    tasks = None if num_rows is None else plan_tasks(num_rows, cfg.samples_per_shard)
    bar = _Progress(progress, num_rows, out, cfg.samples_per_shard)
    own = {"shards": 0, "samples": 0, "rejects": 0}
    last_manifest = [time.monotonic()]

    def on_record(rec: dict) -> None:
        own["shards"] += 1
        own["samples"] += rec["nsamples"]
        own["rejects"] += rec["rejects"]
        bar.update(extra={"shards": own["shards"], "rejects": own["rejects"]})
        if dist.is_main and time.monotonic() - last_manifest[0] > cfg.manifest_interval_s:
            writer.assemble(out, header, writer.list_records(out), complete=False)
            last_manifest[0] = time.monotonic()

    t_gen = time.perf_counter()
    if cfg.executor == "ray":
        if dist.is_main:
            run_ray(cfg, out, tasks, header, on_record)
        streamed_rows = None
    else:
        streamed_rows = run_accelerate(cfg, dist, out, inputs, outputs, tasks, on_record)
    gen_s = time.perf_counter() - t_gen
    if streamed_rows is not None:
        header["input_rows"] = streamed_rows
        header["num_tasks"] = -(-streamed_rows // cfg.samples_per_shard)
    counts = dist.allreduce_sum(np.array([own["shards"], own["samples"], own["rejects"]], dtype=np.float64))
    dist.barrier()
    bar.close()

    # -- finalize -------------------------------------------------------------------------------------
    summary: dict[str, Any] = {}
    if dist.is_main:
        records = writer.list_records(out)
        missing = [t for t in range(header["num_tasks"]) if t not in records]
        header["last_run"] = {"world_size": dist.world, "executor": cfg.executor, "threads": threads,
                              "device": str(dist.device), "wall_s": round(time.perf_counter() - t_start, 3)}
        manifest = writer.assemble(out, header, records, complete=not missing)
        if not missing:
            writer.remove_temps(out)
        tot = manifest["totals"]
        summary = {
            "out": str(out), "status": manifest["status"], "shards": tot["shards"], "num_tasks": header["num_tasks"],
            "missing_tasks": len(missing), "samples": tot["samples"], "rejects": tot["rejects"],
            "reject_reasons": tot["reject_reasons"], "truncated": tot["truncated"],
            "this_run": {"shards": int(counts[0]), "samples": int(counts[1]), "rejects": int(counts[2]),
                         "generate_s": round(gen_s, 3), "fit_s": round(fit_s, 3),
                         "samples_per_s": round(counts[1] / gen_s, 1) if gen_s > 0 and counts[1] else 0.0,
                         "processes": dist.world},
            "stage_seconds": tot["seconds"],
            "wall_s": round(time.perf_counter() - t_start, 3),
        }
        if cfg.progress:
            print(format_summary(summary), flush=True)
    dist.barrier()
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`generate`'s result."""
    run = s["this_run"]
    stages = s["stage_seconds"]
    total = sum(stages.values()) or 1.0
    split = "  ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in stages.items())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reject_reasons"].items())) or "none"
    lines = [
        f"[anisogen] {s['status']}: {s['shards']}/{s['num_tasks']} shards, {s['samples']} samples, "
        f"{s['rejects']} rejects ({reasons}), {s['truncated']} truncated -> {s['out']}",
        f"[anisogen] this run: {run['shards']} shards / {run['samples']} samples in {run['generate_s']:.1f}s "
        f"= {run['samples_per_s']:.1f} samples/s on {run['processes']} process(es); fit {run['fit_s']:.1f}s; "
        f"wall {s['wall_s']:.1f}s",
        f"[anisogen] stage split (summed over shards): {split}",
    ]
    if s["missing_tasks"]:
        lines.append(f"[anisogen] {s['missing_tasks']} task(s) not done yet (other workers or an interrupted run): "
                     "rerun the same command to finish")
    return "\n".join(lines)
