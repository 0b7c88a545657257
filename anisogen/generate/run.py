"""Orchestration of a generation run: resume checks, dedup scan, fit-then-generate, executors, summary.

Stages (every process runs the same code; "main" = local process 0 of the accelerate group):

1. **open**: load the CLIP model (:func:`anisogen.encode.load_clip`), open the corpus (main first, so the
   Arrow cache is built once), resolve the config and its fingerprint (the inputs' content identities are
   read by main only and shared with :meth:`Dist.from_main`).
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
5. **generate**: the tasks of this process (``rank::world``) not already published go to an executor
   (:mod:`.executors`): prepared in DataLoader workers, encoded, aligned and cast on the device in the main
   thread, and written (tar, record) by a background writer thread; or one Ray task per shard.
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
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..encode.corpus import Corpus, Record, find_duplicates, sample_rows
from ..encode.text import TextEncoder
from ..shards import writer
from ..shards.schema import (
    ALIGNER_DIRNAME, MANIFEST_NAME, RECORDS_DIRNAME, REJECTS_NAME, SHARD_GLOB, SIZES_NAME, fingerprint, npy_bytes,
)
from .config import GenerateConfig, GenerateInputError
from .context import DEDUP_NAME, ContextFactory, build_context, is_pending, make_encoder, open_corpus
from .faults import FaultInjector, OnEvent, no_event
from .task import assign, plan_tasks
from ..cli import UserError

logger = logging.getLogger("anisogen.generate")

FIT_DIRNAME = "fit"
FIT_CHUNK = 4096
#: How substitutes are computed (part of the fingerprint: runs made by another path are not resumed).
ALIGN_PATH = "device-fp32-block"


class ConfigMismatch(UserError, RuntimeError):
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

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` run on the main process only; its (picklable) result on every process of the group.

        Collective: every process must call it. An exception on the main process is raised there and, as the
        same exception (or a ``RuntimeError`` naming it when it cannot be pickled), on the other processes,
        so none of them waits forever.
        """
        if self.group_world == 1:
            return compute()
        import pickle

        import torch.distributed as td

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", compute())
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have been told
                error = exc
                try:
                    pickle.dumps(exc)
                    box[0] = ("error", exc)
                except Exception:  # noqa: BLE001
                    box[0] = ("error", RuntimeError(f"main process failed: {type(exc).__name__}: {exc}"))
        td.broadcast_object_list(box, src=0, device=self.state.device)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "error":
            raise value
        return value

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


def _input_identities(cfg: GenerateConfig, corpus: Corpus) -> dict[str, Any]:
    """Content identities of the inputs (corpus files, image source, ``--aligner-dir``): the part of
    :func:`resolve` that reads files."""
    from ..encode.images import describe_image_source

    out: dict[str, Any] = {"corpus_resolved": corpus.describe()}
    if cfg.images:
        out["images_resolved"] = describe_image_source(cfg.images)
    if cfg.aligner_dir:
        out["aligner_dir_sha256"] = _dir_digest(Path(cfg.aligner_dir))
    return out


def resolve(cfg: GenerateConfig, corpus: Corpus, model_fingerprint: str, encoder: TextEncoder, *,
            dist: Dist | None = None) -> dict[str, Any]:
    """The fingerprinted, resolved config: output-affecting flags + what they point to.

    With ``dist`` (collective: every process calls it) the input files are read by the main process only and
    their identities shared with the others (:meth:`Dist.from_main`); without it this process reads them.
    """
    ids = dist.from_main(partial(_input_identities, cfg, corpus)) if dist is not None else \
        _input_identities(cfg, corpus)
    out = cfg.output_config()
    out.pop("corpus")
    out["corpus_resolved"] = ids["corpus_resolved"]
    out["corpus_kind"] = corpus.kind
    out["model_fingerprint"] = model_fingerprint
    out["precision"] = encoder.precision
    out["device_type"] = encoder.device.type
    out["trimmed"] = encoder.trimmed
    out["pad_multiple"] = encoder.pad_multiple
    out["align_path"] = ALIGN_PATH
    out.pop("images")
    out.pop("aligner_dir")
    for key in ("images_resolved", "aligner_dir_sha256"):
        if key in ids:
            out[key] = ids[key]
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
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GenerateInputError(f"--out {out}: {MANIFEST_NAME} is not valid JSON ({exc}); use --overwrite to "
                                     "discard that folder's outputs, or a new --out") from None
        if old.get("config_fingerprint") == fp:
            return "resume"
        if not _wrote_anything(out):
            logger.warning("%s: the earlier run (another config) wrote no shard; starting over with this config", out)
            return "overwrite"
        diff = _config_diff(old.get("config", {}), resolved)
        raise ConfigMismatch(
            f"{out} holds a run with a different config (fingerprint {str(old.get('config_fingerprint'))[:12]} vs "
            f"{fp[:12]}); changed: " + "; ".join(diff[:8]) + ". Use the original flags to resume, a new --out, "
            "or --overwrite to discard the previous outputs.")
    stray = _published_outputs(out)
    if stray and not cfg.overwrite:
        raise ConfigMismatch(f"{out} holds shard files but no {MANIFEST_NAME}; refusing to mix outputs "
                             "(use --overwrite or a new --out)")
    return "overwrite" if stray else "fresh"


def _published_outputs(out: Path) -> list[Path]:
    """The shard tars and completion records in ``out``."""
    return list(out.glob(SHARD_GLOB)) + list((out / RECORDS_DIRNAME).glob("*.json"))


def _wrote_anything(out: Path) -> bool:
    """Whether ``out`` holds any shard, completion record or temp tar (work a config change would discard)."""
    return bool(_published_outputs(out) or list(out.glob("*.tar.*.tmp")))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    writer.atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------- aligner fit
def fit_or_load_aligner(cfg: GenerateConfig, dist: Dist, out: Path, corpus: Corpus, encoder: TextEncoder,
                        model, preprocess, model_fingerprint: str, *, progress: bool,
                        on_event: OnEvent = no_event) -> Any:
    """Stage 4 (see module docstring). Returns the aligner every process loaded from disk."""
    from ..align import fit_aligner, load_aligner

    if cfg.aligner_dir:
        try:
            return load_aligner(cfg.aligner_dir, model_fingerprint=model_fingerprint)
        except (ValueError, FileNotFoundError) as exc:
            raise GenerateInputError(f"--aligner-dir: {exc}") from None
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
        on_event("fit_chunk")
    dist.barrier()
    if dist.is_main and not (art / "config.json").is_file():
        parts = [np.load(fit_dir / f"text-{j:05d}.npy", allow_pickle=False) for j in range(len(chunks))]
        text = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
        if len(text) == 0:
            raise ValueError("the fit sample holds no valid texts (every sampled record was rejected)")
        from ..encode.images import load_image_embeddings

        try:
            image = load_image_embeddings(cfg.images, model=model, preprocess=preprocess,
                                          model_fingerprint=model_fingerprint, device=encoder.device,
                                          limit=cfg.fit_images, num_workers=min(cfg.workers, 4), progress=progress)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise GenerateInputError(f"--images {cfg.images}: {exc}") from None
        if image.shape[1] != text.shape[1]:
            raise GenerateInputError(f"--images {cfg.images}: image embeddings have d={image.shape[1]}, "
                                     f"the text embeddings d={text.shape[1]}; "
                                     f"embed the images with --model {cfg.model}")
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


# ------------------------------------------------------------------------------------ progress
class _Progress:
    """Main-process tqdm over input rows, advanced from the completion records of all processes; its postfix
    counts the shards and the rejects of every process (each record is read once)."""

    def __init__(self, enabled: bool, total: int | None, out: Path, sps: int):
        self.bar = None
        self.out, self.sps, self.last = out, sps, 0.0
        self.seen: set[str] = set()
        self.rejects = 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="generate", smoothing=0.1)

    def _read_new_records(self, files: list[Path]) -> None:
        for f in files:
            if f.name in self.seen:
                continue
            try:  # records are published atomically; an unreadable one is retried at the next update
                self.rejects += int(json.loads(f.read_text(encoding="utf-8")).get("rejects", 0))
            except (OSError, ValueError):
                continue
            self.seen.add(f.name)

    def update(self, force: bool = False) -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        files = list((self.out / RECORDS_DIRNAME).glob("shard-*.json"))
        self._read_new_records(files)
        done = len(files) * self.sps
        if self.bar.total is not None:
            done = min(done, self.bar.total)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        self.bar.set_postfix({"shards": len(files), "rejects": self.rejects}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()


# ---------------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------------- main
@dataclass
class _Run:
    """What the steps of one :func:`generate` call share."""

    cfg: GenerateConfig
    dist: Dist
    out: Path
    on_event: OnEvent
    progress: bool
    bundle: Any = None
    encoder: TextEncoder | None = None
    corpus: Corpus | None = None
    header: dict | None = None

    @property
    def model_fingerprint(self) -> str:
        return self.bundle[0].anisogen_fingerprint


def generate(cfg: GenerateConfig, *, dist: Dist | None = None, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Run (or resume) a generation; returns the summary dict (also printed on the main process).

    ``on_event`` receives the crash-test points of :mod:`.faults`; by default the ``ANISOGEN_FAULT``
    injector (inactive unless that variable is set).
    """
    cfg.validate().check_references()
    t_start = time.perf_counter()
    dist = dist or Dist.from_accelerate(cfg)
    run = _Run(cfg, dist, Path(cfg.out), on_event or FaultInjector.from_env(), cfg.progress and dist.is_main)
    threads = _set_threads(cfg, dist)
    run.out.mkdir(parents=True, exist_ok=True)
    _open_inputs(run)
    _start_or_resume(run)
    _dedup_scan(run)
    t_fit = time.perf_counter()
    aligner = _aligner_step(run)
    fit_s = time.perf_counter() - t_fit
    if cfg.fit_only:
        return _fit_only_summary(run, fit_s)
    t_gen = time.perf_counter()
    own = _generate_shards(run, aligner)
    gen_s = time.perf_counter() - t_gen
    counts = dist.allreduce_sum(np.array([own["shards"], own["samples"], own["rejects"]], dtype=np.float64))
    dist.barrier()
    summary = _finalize(run, counts, threads=threads, gen_s=gen_s, fit_s=fit_s, t_start=t_start) if dist.is_main else {}
    dist.barrier()
    return summary


def _open_inputs(run: _Run) -> None:
    """Load the model, open the corpus (main process first: it builds the Arrow cache once)."""
    from ..encode.clip import load_clip

    cfg = run.cfg
    try:
        run.bundle = load_clip(cfg.model, cfg.pretrained, device=run.dist.device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise GenerateInputError(f"--model {cfg.model} --pretrained {cfg.pretrained}: {exc}") from None
    run.encoder = make_encoder(cfg, run.bundle, run.dist.device)
    run.corpus = open_corpus(cfg)
    with run.dist.main_first():
        run.corpus.dataset()
        run.corpus.check_fields()
    if cfg.executor == "ray" and run.corpus.streaming:
        raise ValueError("--executor ray needs random access to the corpus: use local files without --streaming")


def _start_or_resume(run: _Run) -> None:
    """Resume check (read-only everywhere), then main clears or opens the folder with a "running" manifest."""
    cfg, dist, out = run.cfg, run.dist, run.out
    resolved = resolve(cfg, run.corpus, run.model_fingerprint, run.encoder, dist=dist)
    mode = check_resume(cfg, out, resolved)
    dist.barrier()
    num_rows = run.corpus.num_rows
    run.header = {
        "config": resolved, "config_fingerprint": fingerprint(resolved), "model_fingerprint": run.model_fingerprint,
        "aligner": {"name": cfg.aligner, "fingerprint": None}, "dim": run.encoder.embed_dim, "dtype": cfg.dtype,
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
            writer.assemble(out, run.header, writer.list_records(out), complete=False)
    dist.barrier()


def _dedup_scan(run: _Run) -> None:
    if not run.cfg.dedup:
        return
    if run.dist.is_main and not (run.out / DEDUP_NAME).is_file():
        rows, first = find_duplicates(run.corpus, progress=run.progress)
        _save_npz(run.out / DEDUP_NAME, rows=rows, first=first)
    run.dist.barrier()


def _aligner_step(run: _Run):
    """Fit (or load) the aligner and record it in the header."""
    cfg = run.cfg
    model, preprocess, _ = run.bundle
    aligner = fit_or_load_aligner(cfg, run.dist, run.out, run.corpus, run.encoder, model, preprocess,
                                  run.model_fingerprint, progress=run.progress, on_event=run.on_event)
    aligner_dir = Path(cfg.aligner_dir) if cfg.aligner_dir else run.out / ALIGNER_DIRNAME
    digest = run.dist.from_main(partial(_dir_digest, aligner_dir))
    run.header["aligner"] = {"name": aligner.name, "fingerprint": digest,
                             "dir": ALIGNER_DIRNAME if not cfg.aligner_dir else os.path.abspath(cfg.aligner_dir),
                             "params": aligner.params}
    return aligner


def _fit_only_summary(run: _Run, fit_s: float) -> dict[str, Any]:
    aligner_dir = Path(run.cfg.aligner_dir) if run.cfg.aligner_dir else run.out / ALIGNER_DIRNAME
    if run.dist.is_main:
        writer.assemble(run.out, run.header, writer.list_records(run.out), complete=False)
        print(f"[anisogen] aligner {run.header['aligner']['name']} ready in {aligner_dir} ({fit_s:.1f}s); "
              "rerun without --fit-only to generate", flush=True)
    return {"fit_only": True, "aligner_dir": str(aligner_dir), "fit_s": fit_s}


def _generate_shards(run: _Run, aligner) -> dict[str, int]:
    """Hand this process's pending tasks to the executor; returns this process's counts."""
    from .executors import StreamPlan, run_local

    cfg, dist, out, header = run.cfg, run.dist, run.out, run.header
    num_rows = header["input_rows"]
    bar = _Progress(run.progress, num_rows, out, cfg.samples_per_shard)
    own = {"shards": 0, "samples": 0, "rejects": 0}
    on_record = _record_callback(run, own, bar)
    if cfg.executor == "ray":
        if dist.is_main:
            from .executors.ray import run_ray

            pending = [t for t in plan_tasks(num_rows, cfg.samples_per_shard) if is_pending(out, t.index, cfg.verify)]
            run_ray(pending, ContextFactory.for_run(cfg, run.model_fingerprint), on_record, address=cfg.ray_address,
                    retries=cfg.ray_retries, gpus_per_task=cfg.ray_gpus_per_task,
                    num_cpus=max(1, min(os.cpu_count() or 1, cfg.workers + 1 if cfg.workers else 2)))
    else:
        make_context = lambda: build_context(cfg, dist.device, out=out, bundle=run.bundle, aligner=aligner,  # noqa: E731
                                             corpus=run.corpus, encoder=run.encoder)
        if num_rows is None:
            plan = StreamPlan(cfg.samples_per_shard, dist.rank, dist.world, partial(is_pending, out, verify=cfg.verify))
            rows = run_local(None, make_context, on_record, workers=cfg.workers, stream=plan, on_event=run.on_event)
            header["input_rows"], header["num_tasks"] = rows, -(-rows // cfg.samples_per_shard)
        else:
            mine = [t for t in assign(plan_tasks(num_rows, cfg.samples_per_shard), dist.rank, dist.world)
                    if is_pending(out, t.index, cfg.verify)]
            run_local(mine, make_context, on_record, workers=cfg.workers, on_event=run.on_event)
    dist.barrier()
    bar.close()
    return own


def _record_callback(run: _Run, own: dict, bar: "_Progress") -> Callable[[dict], None]:
    """``on_record``: count, advance the progress bar, refresh the interim manifest now and then (main)."""
    last_manifest = [time.monotonic()]

    def on_record(rec: dict) -> None:
        own["shards"] += 1
        own["samples"] += rec["nsamples"]
        own["rejects"] += rec["rejects"]
        bar.update()
        if run.dist.is_main and time.monotonic() - last_manifest[0] > run.cfg.manifest_interval_s:
            writer.assemble(run.out, run.header, writer.list_records(run.out), complete=False)
            last_manifest[0] = time.monotonic()

    return on_record


def _finalize(run: _Run, counts: np.ndarray, *, threads: int, gen_s: float, fit_s: float, t_start: float) -> dict:
    """Main: assemble the manifest (complete once every task has a record) and build the summary."""
    cfg, dist, out, header = run.cfg, run.dist, run.out, run.header
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
