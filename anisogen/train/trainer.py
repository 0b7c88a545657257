"""The training loop: accelerate DDP, FSDP2 or DeepSpeed (one or many GPUs, multi-node, or CPU gloo), resumable.

``train(TrainConfig(...))`` runs stage 1 (shards of substitute embeddings + captions, ``plain``
template) or stage 2 (JSONL conversations, with or without an image), with any registered method,
and writes::

    <output_dir>/train_config.json     the resolved config
    <output_dir>/metrics.jsonl         one line per logged step / evaluation (also sent to --report-to trackers)
    <output_dir>/generations.jsonl     greedy generations on validation samples at each evaluation
    <output_dir>/checkpoints/step-*/   resumable checkpoints (gathered trainable tensors + optimizer + RNG)
    <output_dir>/rejects/*.jsonl       skipped records with reasons
    <output_dir>/export/               the final export (load with anisogen.train.load_export)
    <output_dir>/run_summary.json      losses, counts, per-rank batch counts, timings

Design points (see docs/TRAINING.md): the data loader is never ``accelerator.prepare``-d (webdataset
splits by rank itself); every rank consumes exactly ``grad_accum`` batches per step; the loss is the
sum of token cross-entropies divided by the number of target tokens in the whole accumulation window
across all ranks; the model and the optimizer are prepared together (:mod:`.distributed`); the
scheduler stays a plain torch object on the unwrapped optimizer (accelerate's scheduler wrapper would
step ``num_processes`` times per call) and is a pure function of the step, so a resumed or extended
run recomputes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import distributed
from .checkpoint import gather_trainable, latest_checkpoint, load_checkpoint, load_trainable, prune_checkpoints, \
    read_state, save_checkpoint, trainable_tensors
from .config import TrainInputError, REPORT_TO_HELP, TrainConfig  # noqa: F401  (re-exported: anisogen.train.trainer.TrainConfig)
from .data import (
    SAMPLING_CHOICES, EmbeddingStore, EmbeddingTransform, ExactPlan, ExampleBuilder, RejectLog, StreamSpec,
    epoch_batches, eval_batches, exact_pipeline, image_rows, list_shards, make_loader, make_seed,
    probe_embedding_shape, read_provenance, train_pipeline,
)
from ..shards.writer import atomic_write_bytes
from .export import write_export
from .lm import load_lm, materialize_lm
from .methods import (
    MethodContext, PostContext, check_postprocessors, get_method, get_postprocessor, optimizer_groups, parse_options,
)
from .model import EmbeddingLM
from .projector import build_projector
from .templates import get_template
from .tracking import resolve_report_to, tracker_config
from .validation import generations, to_device, validation_loss, write_generations


class Trainer:
    """One training run. ``Trainer(cfg).run()`` returns the run summary dict."""

    def __init__(self, cfg: TrainConfig, on_step: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.on_step = on_step  # test seam: called after each optimizer step

    # ================================================================== the run, step by step
    def run(self) -> dict:
        self._setup_accelerator()
        self._setup_data()
        self.model, self.method_info = self._build_model(main=True)
        self._setup_optimizer()
        start_step = self._resume()
        self._start_logging(start_step)
        with StopRequest() as self.stop:
            halted = self._train(start_step)
        return self._finish(halted)

    # ================================================================== setup
    def _log(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(f"[anisogen.train] {msg}", flush=True)

    def _setup_accelerator(self) -> None:
        import os

        cfg = self.cfg
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        if mp not in ("no", "bf16"):
            raise TrainInputError(f"mixed_precision must be auto, no or bf16 (fp16 is unstable here), got {mp!r}")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.mp = mp
        self.trackers = resolve_report_to(cfg.report_to)
        self.acc = distributed.make_accelerator(mixed_precision=mp, log_with=self.trackers, project_dir=str(self.out))
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.parallel = distributed.kind(self.acc)
        if self.parallel == "deepspeed" and (cfg.save_every > 0 or cfg.halt_at_step > 0):
            raise TrainInputError("checkpoints under DeepSpeed are not supported (DeepSpeed's own format is "
                                  "pickle-based); "
                             "use FSDP (docs/accelerate/fsdp.yaml) for resumable sharded runs, or drop "
                             "--save-every/--halt-at-step")
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.rejects_dir = str(self.out / "rejects")
        load_log = RejectLog(cfg.on_error, self.rejects_dir if self.acc.is_main_process else None, tag="load")
        if cfg.stage1_sampling not in SAMPLING_CHOICES:
            raise TrainInputError(f"stage1_sampling must be one of {SAMPLING_CHOICES}, got {cfg.stage1_sampling!r}")
        self.exact_plan = None
        if cfg.train_jsonl:
            if cfg.stage1_sampling == "exact":
                raise TrainInputError("--stage1-sampling exact applies to --train-shards (stage 1); stage-2 JSONL "
                                      "records "
                                 "are always drawn as seeded permutations")
            store = EmbeddingStore(cfg.emb_npy, cfg.emb_shards and list_shards(cfg.emb_shards), cfg.on_error)
            self.train_spec = StreamSpec.from_jsonl(cfg.train_jsonl, store, load_log)
            self.val_spec = StreamSpec.from_jsonl(cfg.val_jsonl, store, load_log) if cfg.val_jsonl else None
            self.emb_shape = store.shape
            prov_src = cfg.emb_shards[0] if cfg.emb_shards else None
        elif cfg.train_shards:
            self.train_spec = StreamSpec.from_shards(cfg.train_shards, prompt=cfg.prompt, log=load_log)
            self.val_spec = (StreamSpec.from_shards(cfg.val_shards, prompt=cfg.prompt, log=load_log)
                             if cfg.val_shards else None)
            if cfg.stage1_sampling == "exact":
                self.exact_plan = ExactPlan.build(self.train_spec.shards, self.train_spec.extra["sizes"], seed=cfg.seed,
                                                  batch_size=cfg.batch_size, world_size=self.world, log=load_log)
                self.train_spec.shards = list(self.exact_plan.shards)
                self.train_spec.num_samples = self.exact_plan.num_samples
            self.emb_shape = probe_embedding_shape(self.train_spec.shards)
            prov_src = self.train_spec.shards[0]
        else:
            raise TrainInputError("no training data: give --train-shards (stage 1) or --train-jsonl (stage 2)")
        if self.train_spec.extra.get("text_only") and cfg.template == "plain":
            raise TrainInputError(f"{cfg.train_jsonl}: {self.train_spec.extra['text_only']} text-only conversations "
                             f"cannot use --template plain (captions need an image); use vicuna_v1 or hf_chat")
        self.load_rejects = load_log.total
        self.provenance = read_provenance(prov_src) if prov_src else {"clip_fingerprint": None, "aligner": None}
        self.transform = EmbeddingTransform(cfg.l2_normalize, cfg.noise_std)
        if self.exact_plan is not None:
            nb, per_worker = self.exact_plan.batches_per_rank, None
        else:
            nb, per_worker = epoch_batches(self.train_spec.num_samples, cfg.batch_size, self.world, cfg.num_workers)
        self.batches_per_epoch, self.worker_batches = nb, per_worker
        self.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * nb / cfg.grad_accum))
        self.resume_from = latest_checkpoint(self.out / "checkpoints") if cfg.resume else None

    def _init_projector(self, projector) -> None:
        """Load stage-1 weights from an export dir or a projector.safetensors (``--init-from``)."""
        from safetensors.torch import load_file

        src = Path(self.cfg.init_from)
        file = src / "projector.safetensors" if src.is_dir() else src
        if not file.is_file():
            raise FileNotFoundError(f"--init-from {src}: no projector.safetensors found")
        if src.is_dir() and (src / "config.json").is_file():
            ecfg = json.loads((src / "config.json").read_text())
            want, have = ecfg["projector"], projector.describe()
            if want != have:
                raise TrainInputError(f"--init-from {src}: projector {want} does not match this run's projector {have}")
            stage1_l2 = ecfg.get("normalization", {}).get("l2_normalize")
            if stage1_l2 is not None and bool(stage1_l2) != self.cfg.l2_normalize:
                raise TrainInputError(f"--init-from {src} was trained with l2_normalize={stage1_l2}; this run has "
                                 f"{self.cfg.l2_normalize}: the embedding normalisation must not change between stages")
            for k in ("clip_fingerprint", "aligner"):
                if self.provenance.get(k) is None:
                    self.provenance[k] = ecfg.get("provenance", {}).get(k)
        try:
            projector.load_state_dict(load_file(str(file)))
        except RuntimeError as exc:
            raise TrainInputError(f"--init-from {file}: projector weights do not fit ({exc})") from None

    def _build_model(self, *, main: bool):
        """LM + projector + the method's modules. ``main=False`` builds a CPU replica on this process
        only (used to write exports of a sharded run), skipping expensive initialisation."""
        cfg = self.cfg
        method = get_method(cfg.method)
        options = parse_options(method, cfg.method_options)
        lm_dtype = torch.bfloat16 if (self.mp == "bf16" and not method.trains_lm_weights) else torch.float32
        torch.manual_seed(cfg.seed)
        weights = "meta" if main and self._meta_lm(method) else "all"
        lm, tok, lm_info = load_lm(cfg.lm, dtype=lm_dtype, seed=cfg.seed, weights=weights)
        if weights == "meta" and self.parallel == "ddp":
            materialize_lm(lm, self.acc.device)  # storage only: DDP's constructor broadcasts rank 0's weights
        n_vec, d_in = self.emb_shape
        torch.manual_seed(cfg.seed)
        projector = build_projector(cfg.projector, d_in, lm.get_input_embeddings().weight.shape[1])
        if cfg.init_from:
            self._init_projector(projector)
        model = EmbeddingLM(lm, projector, tok.convert_tokens_to_ids("<image>"), n_vec)
        model.loss_chunk_tokens = cfg.loss_chunk_tokens
        model.freeze_lm()
        if main:
            self._setup_text(model, tok, lm, lm_info, method)
        device = self.acc.device if main else torch.device("cpu")
        # a meta LM under FSDP stays on meta: accelerate shards it and loads rank 0's weights
        place = (lambda m: m) if weights == "meta" and self.parallel == "fsdp" else (lambda m: m.to(device))
        model = place(model)
        ctx = MethodContext(
            model=model, tokenizer=tok, config=cfg, options=options, device=device, is_main=self.acc.is_main_process,
            resuming=(self.resume_from is not None) or not main, calibration=self._calibration, log=self._log,
            prefix_ids=self.template.prefix_ids(tok), stage=cfg.stage,
        )
        setup = method.prepare(ctx)
        model = place(ctx.model)
        if weights == "meta":
            _storage_for_trainable(model, setup, device)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if main:
            self.method, self.setup, self.lm_on_meta = method, setup, weights == "meta"
        return model, {"options": options, **setup.info}

    def _meta_lm(self, method) -> bool:
        """Off the main process, build the LM on the meta device when its weights come from rank 0
        anyway: DDP (its constructor broadcasts them) or FSDP with ``cpu_ram_efficient_loading``
        (accelerate broadcasts rank 0's state dict while sharding). Methods whose ``prepare`` runs the
        LM (Gap-Init calibration) need real weights everywhere."""
        if self.acc.is_main_process or method.reads_lm_at_setup:
            return False
        if self.parallel == "fsdp":
            return bool(getattr(self.acc.state.fsdp_plugin, "cpu_ram_efficient_loading", False))
        return self.parallel == "ddp"

    def _setup_text(self, model, tok, lm, lm_info, method) -> None:
        """Tokenizer, template, example builder; the base LM copy shipped with exports of the tiny LM."""
        cfg = self.cfg
        self.tokenizer, self.lm_info = tok, lm_info
        self.template = get_template(cfg.template, image_prefix=cfg.image_prefix)
        self.builder = ExampleBuilder(tok, self.template, self.transform, model.image_token_id,
                                      model.num_visual_tokens, self.emb_shape[1], self.emb_shape[0], cfg.max_length)
        self.base_lm_dir = None
        if lm_info.get("saved_in_export") and not method.trains_lm_weights:
            self.base_lm_dir = self.out / "base_lm"
            if self.acc.is_main_process and not (self.base_lm_dir / "config.json").is_file():
                lm.save_pretrained(str(self.base_lm_dir), safe_serialization=True)
        if cfg.grad_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _calibration(self, n: int) -> list[dict]:
        """Up to ``n`` training examples that carry an image, as collated batches (for methods' init)."""
        out, seen = [], 0
        for b in eval_batches(self.train_spec, self.builder, batch_size=self.cfg.batch_size, on_error="skip"):
            b = image_rows(b)
            if b is None:
                continue
            out.append(b)
            seen += len(b["keys"])
            if seen >= n:
                break
        return out

    def _setup_optimizer(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.cfg
        groups, self.group_info = optimizer_groups(self.model, self.setup, self.method, cfg, stage=cfg.stage)
        self.method_info["optimizer"] = self.group_info
        check_postprocessors(cfg, [n for n, p in self.model.named_parameters() if p.requires_grad])
        self.initial_trainable = trainable_tensors(self.model) if self.acc.is_main_process else {}
        n_tr = sum(p.numel() for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        self.ddp, self.optimizer = distributed.prepare(self.acc, self.model, optimizer, batch_size=cfg.batch_size,
                                                       grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm)
        self.warmup = int(round(cfg.warmup_ratio * self.max_steps))
        self.scheduler = get_cosine_schedule_with_warmup(distributed.base_optimizer(self.optimizer), self.warmup,
                                                         self.max_steps)
        self._log(f"method={cfg.method} stage={cfg.stage} trainable={n_tr} parameters; groups="
                  f"{[(g['name'], g['lr'], g['weight_decay']) for g in groups]}; parallelism={self.parallel} "
                  f"world={self.world}; mixed_precision={self.mp}")

    # ================================================================== resume
    def _resume(self) -> int:
        """Restore the newest checkpoint; returns the step to continue from (0 for a fresh run)."""
        cfg = self.cfg
        self.consumed_offset = 0
        if self.resume_from is None:
            return 0
        state = read_state(self.resume_from)
        if state.get("config_fingerprint") != cfg.fingerprint():
            raise TrainInputError(f"{self.resume_from}: the checkpoint was written under a different config "
                             f"(changed: {cfg.changed_fields(state.get('config', {}))}); use a new --output-dir "
                             f"or --no-resume")
        self._check_global_batch(state)
        state = load_checkpoint(self.resume_from, model=self.ddp, optimizer=distributed.base_optimizer(self.optimizer),
                                rank=self.rank)
        step = int(state["step"])
        self._fast_forward_schedule(step)
        self.consumed_offset = self._data_position(state, step)
        old_max = state.get("max_steps")
        extended = (
            f", extended from {old_max} to {self.max_steps} steps" if old_max not in (None, self.max_steps) else ""
        )
        self._log(f"resumed from {self.resume_from} at step {step}{extended}")
        return step

    def _check_global_batch(self, state: dict) -> None:
        d = state["data"]
        old = d["batch_size"] * d["grad_accum"] * d["world_size"]
        new = self.cfg.batch_size * self.cfg.grad_accum * self.world
        if old == new:
            return
        per_step = self.cfg.batch_size * self.world
        hint = (f"--grad-accum {old // per_step}" if old % per_step == 0
                else f"a --batch-size and --grad-accum with batch x accum x {self.world} processes = {old}")
        raise TrainInputError(
            f"{self.resume_from}: the checkpoint was trained with a global batch of {old} samples per step "
            f"({d['world_size']} processes x batch {d['batch_size']} x accum {d['grad_accum']}); this launch gives "
            f"{new} ({self.world} x {self.cfg.batch_size} x {self.cfg.grad_accum}). Keep the global batch: use {hint}")

    def _data_position(self, state: dict, step: int) -> int:
        """Offset between the batches this rank has consumed and ``step x grad_accum``: 0 normally;
        after a change of world size or micro-batch the position is re-derived from the samples
        consumed so far (the stream is resampled, so the continuation is statistically the same)."""
        d = state["data"]
        consumed = d["consumed_batches_per_rank"]
        old_plan = d.get("exact")
        if self.exact_plan is not None and old_plan and old_plan.get("num_samples") != self.exact_plan.num_samples:
            self._log(f"warning: the exact-pass plan changed since the checkpoint ({old_plan.get('num_samples')} -> "
                      f"{self.exact_plan.num_samples} samples; see rejects/): the resumed epoch's order differs")
        if (d["world_size"], d["batch_size"], d["batches_per_epoch"]) != (self.world, self.cfg.batch_size,
                                                                         self.batches_per_epoch):
            samples = consumed * d["batch_size"] * d["world_size"]
            consumed = samples // (self.cfg.batch_size * self.world)
            self._log(f"data position re-derived for {self.world} processes x batch {self.cfg.batch_size}: "
                      f"{samples} samples consumed -> {consumed} batches per rank"
                      + ("; exact-pass sampling: the epoch plan depends on the world size and batch, so the "
                         "once-per-epoch guarantee holds again from the next data epoch" if self.exact_plan else ""))
        return consumed - step * self.cfg.grad_accum

    def _fast_forward_schedule(self, step: int) -> None:
        """Set the learning rates to the schedule's value after ``step`` steps (the schedule is a pure
        function of the step and the run length, so an extended run gets the new length's curve)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler.last_epoch = step - 1
            self.scheduler.step()

    # ================================================================== the loop
    def _start_logging(self, start_step: int) -> None:
        cfg = self.cfg
        if self.acc.is_main_process:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
            _truncate_metrics(self.out / "metrics.jsonl", start_step)
        if self.trackers:
            self.acc.init_trackers(self.out.name or "anisogen", config=tracker_config(cfg.to_dict()))
        if self.exact_plan is not None:
            p = self.exact_plan.describe()
            self._log(f"exact-pass sampling: {p['num_shards']} shards, {p['num_samples']} samples, "
                      f"{p['samples_per_epoch']} trained per epoch, {p['dropped_per_epoch']} dropped per epoch "
                      f"(the last of each epoch's seeded order, so every rank gets {p['batches_per_rank']} full "
                      f"batches)")
        self._log(f"{self.train_spec.num_samples} training samples, {self.batches_per_epoch} batches/rank/epoch, "
                  f"steps {start_step}->{self.max_steps} (warmup {self.warmup}), load-time rejects "
                  f"{self.load_rejects}, "
                  f"trackers {self.trackers or 'none'}")
        self.summary = {"is_main": self.acc.is_main_process, "start_step": start_step, "max_steps": self.max_steps,
                        "batches_per_epoch": self.batches_per_epoch, "world_size": self.world,
                        "parallelism": self.parallel, "losses": [], "evals": [],
                        "stage1_sampling": cfg.stage1_sampling if cfg.train_shards and not cfg.train_jsonl else None,
                        "exact_plan": self.exact_plan.describe() if self.exact_plan is not None else None}
        self.totals = {"rejected": 0, "truncated": 0, "tokens": 0, "data_wait_s": 0.0, "step_s": 0.0}
        self.n_batches = 0
        self.bar = None
        if cfg.progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _train(self, start_step: int) -> bool:
        """Steps ``start_step+1 .. max_steps``; returns True when halted early (``--halt-at-step``)."""
        cfg = self.cfg
        stream = self._stream(start_step * cfg.grad_accum + self.consumed_offset)
        self.ddp.train()
        self.final_step = start_step
        for step in range(start_step + 1, self.max_steps + 1):
            rec = self._train_step(step, stream)
            self._record(step, rec)
            self.final_step = step
            if (
                self.val_spec is not None
                and cfg.eval_every > 0
                and (step % cfg.eval_every == 0 or step == self.max_steps)
            ):
                self._evaluate(step)
            if self.on_step is not None:
                self.on_step(step)
            interrupted = self._stop_requested() and step < self.max_steps
            halt = 0 < cfg.halt_at_step == step < self.max_steps or interrupted
            if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == self.max_steps or halt:
                self._save(step)
            if halt:
                why = f"interrupted by {self.stop.name}" if interrupted else "halted"
                self.summary["interrupted"] = self.stop.name if interrupted else None
                self._log(f"{why} at step {step} (checkpoint saved); rerun the same command to resume")
                return True
        return False

    def _stop_requested(self) -> bool:
        """Collective: whether any rank got SIGINT/SIGTERM (all ranks stop at the same step)."""
        flag = self.stop.requested
        if self.world > 1:
            t = torch.tensor([int(flag)], device=self.acc.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _stream(self, consumed: int) -> Iterator[dict]:
        cfg = self.cfg
        epoch, skip = divmod(consumed, self.batches_per_epoch)
        if self.exact_plan is not None:  # start at the cursor: nothing before it is read
            while True:
                pipe = exact_pipeline(self.train_spec, self.builder, self.exact_plan, rank=self.rank, epoch=epoch,
                                      start=skip, on_error=cfg.on_error, rejects_dir=self.rejects_dir)
                loader = make_loader(pipe, cfg.num_workers, seed=make_seed(cfg.seed, epoch, self.rank),
                                     pin_memory=torch.cuda.is_available())
                for batch in loader:
                    batch["data_epoch"] = epoch
                    yield batch
                skip = 0
                epoch += 1
        while True:
            pipe = train_pipeline(
                self.train_spec, self.builder, batch_size=cfg.batch_size, num_worker_batches=self.worker_batches,
                seed=cfg.seed, epoch=epoch, shuffle_buffer=cfg.shuffle_buffer, on_error=cfg.on_error,
                rejects_dir=self.rejects_dir,
            )
            loader = make_loader(pipe, cfg.num_workers, seed=make_seed(cfg.seed, epoch, self.rank),
                                 pin_memory=torch.cuda.is_available())
            for i, batch in enumerate(loader):
                if i < skip:
                    continue
                batch["data_epoch"] = epoch
                yield batch
            skip = 0
            epoch += 1

    def _next_window(self, stream) -> tuple[list[dict], float]:
        micro, wait = [], 0.0
        for _ in range(self.cfg.grad_accum):
            tw = time.perf_counter()
            micro.append(next(stream))
            wait += time.perf_counter() - tw
        self.n_batches += len(micro)
        return micro, wait

    def _window_stats(self, step: int, micro: list[dict]) -> torch.Tensor:
        """(target tokens, rejected, truncated, input tokens) summed over the window and all ranks."""
        n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        stats = torch.tensor([n_local, sum(b["n_rejected"] for b in micro), sum(b["n_truncated"] for b in micro),
                              sum(int(b["attention_mask"].sum()) for b in micro)],
                             dtype=torch.float64, device=self.acc.device)
        stats = self.acc.reduce(stats, reduction="sum")
        if float(stats[0]) == 0:
            raise RuntimeError(f"step {step}: no target tokens in the accumulation window")
        return stats

    def _train_step(self, step: int, stream) -> dict:
        t0 = time.perf_counter()
        micro, wait = self._next_window(stream)
        stats = self._window_stats(step, micro)
        n_total = float(stats[0])
        loss_local = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        for i, b in enumerate(micro):
            b = to_device(b, self.acc.device)
            last = i == len(micro) - 1
            self.acc.gradient_state._set_sync_gradients(last)  # DeepSpeed steps its engine on the last one
            with contextlib.nullcontext() if last else self.acc.no_sync(self.ddp):
                with self.acc.autocast():
                    ls, _ = self.ddp(b["input_ids"], b["attention_mask"], b["emb"], b["labels"],
                                     has_image=b["has_image"])
                self.acc.backward(ls * (self.world / n_total))
            loss_local += ls.detach().double()
        grad_norm = self._optimizer_step()
        loss = float(self.acc.reduce(loss_local, reduction="sum")) / n_total
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: non-finite loss {loss}")
        dt = time.perf_counter() - t0
        return {"type": "train", "step": step, "loss": loss,
                "lr": [g["lr"] for g in distributed.base_optimizer(self.optimizer).param_groups],
                "grad_norm": grad_norm, "tokens": int(n_total), "input_tokens": int(stats[3]),
                "tokens_per_s": n_total / dt, "input_tokens_per_s": float(stats[3]) / dt, "data_wait_s": wait,
                "step_s": dt, "rejected": int(stats[1]), "truncated": int(stats[2]),
                "data_epoch": int(micro[-1]["data_epoch"])}

    def _optimizer_step(self) -> float | None:
        cfg = self.cfg
        grad_norm = None
        if cfg.max_grad_norm > 0 and self.parallel != "deepspeed":
            trainable = [p for p in self.ddp.parameters() if p.requires_grad]
            grad_norm = float(self.acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record(self, step: int, rec: dict) -> None:
        cfg, t = self.cfg, self.totals
        t["rejected"] += rec["rejected"]
        t["truncated"] += rec["truncated"]
        t["tokens"] += rec["tokens"]
        t["data_wait_s"] += rec["data_wait_s"]
        t["step_s"] += rec["step_s"]
        self.summary["losses"].append(rec["loss"])
        if step % max(1, cfg.log_every) == 0 or step == self.max_steps or step == self.summary["start_step"] + 1:
            self._write_metrics(rec)
            if self.trackers:
                self.acc.log({"train/loss": rec["loss"], "train/tokens_per_s": rec["tokens_per_s"],
                              **{f"train/lr_{i}": lr for i, lr in enumerate(rec["lr"])}}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    def _write_metrics(self, rec: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ================================================================== evaluation
    def _evaluate(self, step: int) -> dict:
        """Collective: validation loss over all ranks, then generations (written by the main process)."""
        cfg = self.cfg
        model = self.acc.unwrap_model(self.ddp)
        model.eval()
        val_loss, tokens = validation_loss(model, self.acc, self.val_spec, self.builder, batch_size=cfg.batch_size,
                                           max_batches=cfg.eval_max_batches or None)
        rec = {"type": "eval", "step": step, "val_loss": val_loss, "val_tokens": tokens}
        if cfg.log_generations > 0:
            gens = generations(model, self.acc, self.val_spec, self.builder, self.template, self.tokenizer,
                               step=step, n=cfg.log_generations, max_new_tokens=cfg.max_new_tokens)
            if self.acc.is_main_process:
                write_generations(self.out / "generations.jsonl", gens)
        model.train()
        self.acc.wait_for_everyone()
        self.summary["evals"].append(rec)
        self._write_metrics(rec)
        if self.trackers:
            self.acc.log({"val/loss": val_loss}, step=step)
        self._log(f"step {step}: val_loss={val_loss:.4f}")
        return rec

    # ================================================================== checkpoints
    def _save(self, step: int) -> None:
        if self.parallel == "deepspeed":
            return
        cfg = self.cfg
        state = {
            "config_fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "max_steps": self.max_steps,
            "parallelism": self.parallel,
            "data": {"consumed_batches_per_rank": step * cfg.grad_accum + self.consumed_offset,
                     "batches_per_epoch": self.batches_per_epoch, "world_size": self.world,
                     "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum},
        }
        if self.exact_plan is not None:  # where a resumed exact-pass stream starts (= consumed, split by epoch)
            epoch, cursor = divmod(state["data"]["consumed_batches_per_rank"], self.batches_per_epoch)
            state["data"]["sampling"] = "exact"
            state["data"]["exact"] = {"epoch": epoch, "batch_cursor": cursor, **self.exact_plan.describe()}
        save_checkpoint(self.out / "checkpoints", step, model=self.ddp,
                        optimizer=distributed.base_optimizer(self.optimizer), state=state, rank=self.rank,
                        is_main=self.acc.is_main_process, barrier=self.acc.wait_for_everyone)
        if self.acc.is_main_process:
            prune_checkpoints(self.out / "checkpoints", cfg.keep_checkpoints)

    # ================================================================== export and summary
    def _finish(self, halted: bool) -> dict:
        if self.bar is not None:
            self.bar.close()
        counts = self.acc.gather(torch.tensor([self.n_batches], device=self.acc.device)).tolist()
        meta = self.acc.gather(torch.tensor([int(self.lm_on_meta)], device=self.acc.device)).tolist()
        t = self.totals
        self.summary.update({
            "final_step": self.final_step, "halted": halted, "batches_per_rank": counts, "lm_loaded_on_meta": meta, **t,
            "stall_fraction": t["data_wait_s"] / t["step_s"] if t["step_s"] > 0 else 0.0,
            "load_rejects": self.load_rejects,
        })
        if not halted:
            export_dir = self.out / "export"
            model = self._export_model()
            if self.acc.is_main_process:
                self.write_export(export_dir, model=model)
                self.summary["export_dir"] = str(export_dir)
                self.summary["post"] = self._post(export_dir, model)
            self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (self.out / "run_summary.json").write_text(json.dumps(self.summary, indent=1))
        self.acc.wait_for_everyone()
        for tracker in self.acc.trackers:  # not end_training(): that also destroys the process group
            tracker.finish()
        return self.summary

    def _export_model(self):
        """Collective. The model whose tensors the export holds: the unwrapped model, or -- when the
        run is sharded -- a CPU replica on the main process loaded with the gathered trainable tensors."""
        if not distributed.is_sharded(self.acc):
            return self.acc.unwrap_model(self.ddp)
        if self.parallel == "deepspeed":
            full = self.acc.get_state_dict(self.ddp)
            names = {n for n, p in self.acc.unwrap_model(self.ddp).named_parameters() if p.requires_grad}
            full = {n: t.float() for n, t in (full or {}).items() if n in names}
        else:
            full = gather_trainable(self.ddp)
        if not self.acc.is_main_process:
            return None
        replica, _ = self._build_model(main=False)
        load_trainable(replica, full)
        return replica

    def _export_config(self) -> dict:
        cfg = self.cfg
        return {
            "lm": self.lm_info,
            "template": cfg.template,
            "image_prefix": cfg.image_prefix,
            "default_prompt": cfg.prompt,
            "max_length": cfg.max_length,
            "normalization": self.transform.describe(),
            "provenance": self.provenance,
            "clip_fingerprint": self.provenance.get("clip_fingerprint"),
            "aligner": self.provenance.get("aligner"),
            "train_config_fingerprint": cfg.fingerprint(),
        }

    def write_export(self, out_dir: Path, projector_state=None, *, model=None) -> Path:
        return write_export(
            out_dir, model=model if model is not None else self._export_target, tokenizer=self.tokenizer,
            config=self._export_config(), method=self.method, method_info=self.method_info,
            base_lm_dir=self.base_lm_dir, projector_state=projector_state,
        )

    def _post(self, export_dir: Path, model) -> dict:
        self._export_target = model
        reports = {}
        for item in self.cfg.post:
            name, _, spec = item.partition(":")
            ctx = PostContext(
                model=model, tokenizer=self.tokenizer, config=self.cfg, export_dir=export_dir, output_dir=self.out,
                initial_trainable=self.initial_trainable, write_export=self.write_export, log=self._log,
            )
            reports[item] = get_postprocessor(name).run(ctx, spec)
        return reports


def _storage_for_trainable(model, setup, device) -> None:
    """Give the trainable parameters of a meta-loaded model real (uninitialised) storage, and point the
    method's groups at the new parameter objects. accelerate's FSDP2 preparation maps optimizer
    parameters to their sharded replacements by storage pointer, which is 0 for every meta tensor;
    the values themselves are broadcast from rank 0."""
    names = {id(p): n for n, p in model.named_parameters()}
    for mod in model.modules():
        if any(p.requires_grad and p.is_meta for p in mod.parameters(recurse=False)):
            mod.to_empty(device=device, recurse=False)
    fresh = dict(model.named_parameters())
    for g in setup.groups:
        g.params = [fresh[names[id(p)]] if id(p) in names else p for p in g.params]


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Keep only the metrics lines of steps <= ``start_step``: a resumed run re-logs the steps it redoes
    (those after the last checkpoint), so they would otherwise appear twice."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None  # a line cut by a crash
            dropped += 1
            continue
        if step is not None and step > start_step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        atomic_write_bytes(path, "".join(x + "\n" for x in keep).encode("utf-8"))


class StopRequest:
    """SIGINT/SIGTERM while training: the first one asks the loop to checkpoint at the end of the current
    step and stop (resumable); a second one interrupts at once. Handlers are restored on exit. Only the main
    thread can install handlers; elsewhere this does nothing."""

    def __init__(self):
        self.requested, self.name, self._old = False, None, {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.name = True, signal.Signals(signum).name
        print(f"[anisogen.train] {self.name}: saving a checkpoint at the end of this step "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> dict:
    """Run one training job (see :class:`Trainer`); returns the run summary. ``on_step(step)`` is called
    after each optimizer step (a test seam)."""
    return Trainer(cfg, on_step=on_step).run()
