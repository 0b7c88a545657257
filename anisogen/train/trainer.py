"""The training loop: accelerate DDP (CPU gloo, one or many GPUs, multi-node), resumable.

``train(TrainConfig(...))`` runs stage 1 (shards of substitute embeddings + captions, ``plain``
template) or stage 2 (JSONL conversations), with any registered method, and writes::

    <output_dir>/train_config.json     the resolved config
    <output_dir>/metrics.jsonl         one line per logged step / evaluation
    <output_dir>/generations.jsonl     greedy generations on validation samples at each evaluation
    <output_dir>/checkpoints/step-*/   resumable checkpoints (trainable tensors + optimizer + RNG)
    <output_dir>/rejects/*.jsonl       skipped records with reasons
    <output_dir>/export/               the final export (load with anisogen.train.load_export)
    <output_dir>/run_summary.json      losses, counts, per-rank batch counts, timings

Design points (see docs/TRAINING.md): the data loader is never ``accelerator.prepare``-d (webdataset
splits by rank itself); every rank consumes exactly ``grad_accum`` batches per step; the loss is the
sum of token cross-entropies divided by the number of target tokens in the whole accumulation window
across all ranks; only the model is wrapped by accelerate (DDP), the optimizer and scheduler stay
plain torch objects (accelerate's scheduler wrapper would step ``num_processes`` times per call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, trainable_tensors
from .data import (
    EmbeddingStore, EmbeddingTransform, ExampleBuilder, RejectLog, SampleError, StreamSpec, epoch_batches,
    eval_batches, make_loader, make_seed, probe_embedding_shape, read_provenance, train_pipeline,
)
from .export import write_export
from .lm import load_lm
from .methods import MethodContext, PostContext, get_method, get_postprocessor, parse_options
from .model import EmbeddingLM
from .projector import build_projector
from .templates import get_template

#: Config fields that do not change the training trajectory (may differ on resume).
_NON_TRAJECTORY = {
    "resume", "halt_at_step", "progress", "eval_every", "eval_max_batches", "log_generations", "max_new_tokens",
    "log_every", "save_every", "keep_checkpoints", "tensorboard", "post", "val_shards", "val_jsonl",
}


@dataclass
class TrainConfig:
    """All trainer settings; ``pipelines/train.py --help`` documents each flag of the same name."""

    output_dir: str
    lm: str = "tiny"
    # data
    train_shards: list = field(default_factory=list)
    val_shards: list = field(default_factory=list)
    train_jsonl: str | None = None
    val_jsonl: str | None = None
    emb_npy: str | None = None
    emb_shards: list = field(default_factory=list)
    prompt: str = ""
    template: str = "plain"
    max_length: int = 256
    l2_normalize: bool = True
    noise_std: float = 0.0
    on_error: str = "skip"
    num_workers: int = 1
    shuffle_buffer: int = 1000
    # model / method
    projector: str = "mlp2x_gelu"
    init_from: str | None = None
    method: str = "projector"
    method_options: dict = field(default_factory=dict)
    freeze_projector: bool = False
    grad_checkpointing: bool = False
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 0
    epochs: float = 1.0
    lr: float = 1e-3
    adapter_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"
    deterministic: bool = False
    # bookkeeping
    eval_every: int = 0
    eval_max_batches: int = 20
    log_generations: int = 4
    max_new_tokens: int = 32
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    halt_at_step: int = 0
    tensorboard: bool = False
    post: list = field(default_factory=list)
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        d = {k: v for k, v in self.to_dict().items() if k not in _NON_TRAJECTORY}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """One training run. ``Trainer(cfg).run()`` returns the run summary dict."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------ setup
    def _log(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(f"[anisogen.train] {msg}", flush=True)

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        if mp not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no or bf16 (fp16 is unstable here), got {mp!r}")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.mp = mp
        self.acc = Accelerator(
            cpu=not cuda, mixed_precision=mp,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)],
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes

    def _setup_data(self):
        cfg = self.cfg
        self.rejects_dir = str(self.out / "rejects")
        load_log = RejectLog(cfg.on_error, self.rejects_dir if self.acc.is_main_process else None, tag="load")
        if cfg.train_jsonl:
            store = EmbeddingStore(cfg.emb_npy, cfg.emb_shards and _shard_list(cfg.emb_shards), cfg.on_error)
            self.train_spec = StreamSpec.from_jsonl(cfg.train_jsonl, store, load_log)
            self.val_spec = StreamSpec.from_jsonl(cfg.val_jsonl, store, load_log) if cfg.val_jsonl else None
            self.emb_shape = store.shape
            prov_src = cfg.emb_shards[0] if cfg.emb_shards else None
        elif cfg.train_shards:
            self.train_spec = StreamSpec.from_shards(cfg.train_shards, prompt=cfg.prompt)
            self.val_spec = StreamSpec.from_shards(cfg.val_shards, prompt=cfg.prompt) if cfg.val_shards else None
            self.emb_shape = probe_embedding_shape(self.train_spec.shards)
            prov_src = self.train_spec.shards[0]
        else:
            raise ValueError("no training data: give --train-shards (stage 1) or --train-jsonl (stage 2)")
        self.load_rejects = load_log.total
        self.provenance = read_provenance(prov_src) if prov_src else {"clip_fingerprint": None, "aligner": None}
        self.transform = EmbeddingTransform(cfg.l2_normalize, cfg.noise_std)

    def _init_projector(self, projector):
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
                raise ValueError(f"--init-from {src}: projector {want} does not match this run's projector {have}")
            stage1_l2 = ecfg.get("normalization", {}).get("l2_normalize")
            if stage1_l2 is not None and bool(stage1_l2) != self.cfg.l2_normalize:
                raise ValueError(f"--init-from {src} was trained with l2_normalize={stage1_l2}; this run has "
                                 f"{self.cfg.l2_normalize}: the embedding normalisation must not change between stages")
            for k in ("clip_fingerprint", "aligner"):
                if self.provenance.get(k) is None:
                    self.provenance[k] = ecfg.get("provenance", {}).get(k)
        sd = load_file(str(file))
        try:
            projector.load_state_dict(sd)
        except RuntimeError as exc:
            raise ValueError(f"--init-from {file}: projector weights do not fit ({exc})") from None

    def _setup_model(self):
        cfg = self.cfg
        self.method = get_method(cfg.method)
        self.method_options = parse_options(self.method, cfg.method_options)
        lm_dtype = torch.bfloat16 if (self.mp == "bf16" and not self.method.trains_lm_weights) else torch.float32
        torch.manual_seed(cfg.seed)
        lm, tok, lm_info = load_lm(cfg.lm, dtype=lm_dtype, seed=cfg.seed)
        image_id = tok.convert_tokens_to_ids("<image>")
        self.tokenizer, self.lm_info = tok, lm_info
        self._setup_data()
        n_vec, d_in = self.emb_shape
        hidden = lm.get_input_embeddings().weight.shape[1]
        torch.manual_seed(cfg.seed)
        projector = build_projector(cfg.projector, d_in, hidden)
        if cfg.init_from:
            self._init_projector(projector)
        model = EmbeddingLM(lm, projector, image_id, n_vec)
        model.freeze_lm()
        self.base_lm_dir = None
        if lm_info.get("saved_in_export") and not self.method.trains_lm_weights:
            self.base_lm_dir = self.out / "base_lm"
            if self.acc.is_main_process and not (self.base_lm_dir / "config.json").is_file():
                lm.save_pretrained(str(self.base_lm_dir), safe_serialization=True)
        if cfg.grad_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model.to(self.acc.device)
        self.template = get_template(cfg.template)
        self.builder = ExampleBuilder(
            tok, self.template, self.transform, image_id, model.num_visual_tokens, d_in, n_vec, cfg.max_length)
        self.resume_from = latest_checkpoint(self.out / "checkpoints") if cfg.resume else None
        ctx = MethodContext(
            model=self.model, tokenizer=tok, config=cfg, options=self.method_options, device=self.acc.device,
            is_main=self.acc.is_main_process, resuming=self.resume_from is not None,
            calibration=self._calibration, log=self._log,
        )
        setup = self.method.prepare(ctx)
        self.model = ctx.model.to(self.acc.device)
        self.method_info = {"options": self.method_options, **setup.info}
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        groups, seen = [], set()
        for g in setup.groups:
            params = [p for p in g.params if p.requires_grad]
            if not params:
                continue
            if any(id(p) in seen for p in params):
                raise ValueError(f"method {cfg.method!r}: parameter group {g.name!r} repeats parameters")
            seen.update(id(p) for p in params)
            lr = g.lr if g.lr is not None else (cfg.lr if g.role == "projector" else cfg.adapter_lr)
            wd = g.weight_decay if g.weight_decay is not None else cfg.weight_decay
            groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": g.name})
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"method {cfg.method!r} left no trainable parameter")
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:
            raise ValueError(f"method {cfg.method!r}: trainable parameters outside every group: {missing[:5]}")
        self.param_groups = groups
        self.initial_trainable = trainable_tensors(self.model)
        n_tr = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in self.model.parameters())
        self._log(f"method={cfg.method} trainable={n_tr} of {n_all} parameters; groups="
                  f"{[(g['name'], g['lr']) for g in groups]}; lm dtype={lm_dtype}; mixed_precision={self.mp}")

    def _calibration(self, n: int) -> list[dict]:
        bs = self.cfg.batch_size
        return list(eval_batches(self.train_spec, self.builder, batch_size=bs, on_error="skip",
                                 max_batches=max(1, math.ceil(n / bs))))

    # ------------------------------------------------------------------ data stream
    def _stream(self, consumed: int) -> Iterator[dict]:
        cfg = self.cfg
        epoch, skip = divmod(consumed, self.batches_per_epoch)
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

    def _to_device(self, b: dict) -> dict:
        dev = self.acc.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        cfg = self.cfg
        model = self.acc.unwrap_model(self.ddp)
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        count = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        for b in eval_batches(self.val_spec, self.builder, batch_size=cfg.batch_size, rank=self.rank,
                              world_size=self.world, on_error="skip", rejects_dir=None,
                              max_batches=cfg.eval_max_batches or None):
            b = self._to_device(b)
            with self.acc.autocast():
                ls, n = model(b["input_ids"], b["attention_mask"], b["emb"], b["labels"])
            loss_sum += ls.double()
            count += n.double()
        tot = self.acc.reduce(torch.stack([loss_sum, count]), reduction="sum")
        val_loss = float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")
        rec = {"type": "eval", "step": step, "val_loss": val_loss, "val_tokens": int(tot[1])}
        if self.acc.is_main_process and cfg.log_generations > 0:
            gens = self._generations(model, step)
            with open(self.out / "generations.jsonl", "a", encoding="utf-8") as f:
                for g in gens:
                    f.write(json.dumps(g) + "\n")
            rec["generations"] = gens
        self.acc.wait_for_everyone()
        model.train()
        return rec

    def _generations(self, model, step: int) -> list[dict]:
        from .data import Collator

        cfg = self.cfg
        batch = next(iter(eval_batches(self.val_spec, self.builder, batch_size=cfg.log_generations,
                                       on_error="skip", max_batches=1)), None)
        if batch is None:
            return []
        recs = self._val_conversations(batch["keys"])
        exs = []
        for conv in recs:
            prefix = conv[:-1] if conv and conv[-1]["role"] == "assistant" else conv
            enc = self.template.encode(prefix, self.tokenizer, image_token_id=model.image_token_id,
                                       num_image_tokens=model.num_visual_tokens, for_generation=True)
            exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels, "truncated": False,
                        "reference": ""})
        pb = Collator(self.tokenizer.pad_token_id, padding_side="left")(exs)
        with self.acc.autocast():
            ids = model.generate(pb["input_ids"].to(self.acc.device), pb["attention_mask"].to(self.acc.device),
                                 batch["emb"].to(self.acc.device), max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [{"step": step, "key": k, "reference": r, "generated": t.strip()}
                for k, r, t in zip(batch["keys"], batch["references"], texts)]

    def _val_conversations(self, keys: list[str]) -> list[list[dict]]:
        from .data import sample_to_record, shard_samples

        spec = self.val_spec
        want = set(keys)
        found: dict[str, list] = {}
        if spec.records is not None:
            for r in spec.records:
                if r["key"] in want:
                    found[r["key"]] = r["conversation"]
        else:
            for s in shard_samples(({"url": u} for u in spec.shards), RejectLog("skip")):
                if s["__key__"] in want and s["__key__"] not in found:
                    try:
                        found[s["__key__"]] = sample_to_record(s, prompt=spec.prompt)["conversation"]
                    except SampleError:
                        continue
                if len(found) == len(want):
                    break
        return [found[k] for k in keys]

    # ------------------------------------------------------------------ export
    def _export_config(self) -> dict:
        cfg = self.cfg
        return {
            "lm": self.lm_info,
            "template": cfg.template,
            "default_prompt": cfg.prompt,
            "max_length": cfg.max_length,
            "normalization": self.transform.describe(),
            "provenance": self.provenance,
            "clip_fingerprint": self.provenance.get("clip_fingerprint"),
            "aligner": self.provenance.get("aligner"),
            "train_config_fingerprint": cfg.fingerprint(),
        }

    def write_export(self, out_dir: Path, projector_state=None) -> Path:
        return write_export(
            out_dir, model=self.acc.unwrap_model(self.ddp), tokenizer=self.tokenizer, config=self._export_config(),
            method=self.method, method_info=self.method_info, base_lm_dir=self.base_lm_dir,
            projector_state=projector_state,
        )

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        cfg = self.cfg
        self._setup_accelerator()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self._setup_model()
        nb, per_worker = epoch_batches(self.train_spec.num_samples, cfg.batch_size, self.world, cfg.num_workers)
        self.batches_per_epoch, self.worker_batches = nb, per_worker
        max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * nb / cfg.grad_accum))
        warmup = int(round(cfg.warmup_ratio * max_steps))
        from transformers import get_cosine_schedule_with_warmup

        optimizer = torch.optim.AdamW(self.param_groups, betas=(0.9, 0.999), eps=1e-8)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
        self.ddp = self.acc.prepare_model(self.model)
        start_step = 0
        if self.resume_from is not None:
            state = json.loads((self.resume_from / "state.json").read_text())
            if state.get("config_fingerprint") != cfg.fingerprint():
                old = state.get("config", {})
                diff = sorted(k for k in cfg.to_dict() if k not in _NON_TRAJECTORY and old.get(k) != cfg.to_dict()[k])
                raise ValueError(f"{self.resume_from}: the checkpoint was written under a different config "
                                 f"(changed: {diff}); use a new --output-dir or --no-resume")
            state = load_checkpoint(self.resume_from, model=self.acc.unwrap_model(self.ddp), optimizer=optimizer,
                                    scheduler=scheduler, rank=self.rank)
            start_step = int(state["step"])
            if state["data"]["batches_per_epoch"] != nb:
                raise ValueError(f"{self.resume_from}: the data changed size since the checkpoint "
                                 f"({state['data']['batches_per_epoch']} -> {nb} batches per epoch)")
            self._log(f"resumed from {self.resume_from} at step {start_step}")
        if self.acc.is_main_process:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        self._log(f"{self.train_spec.num_samples} training samples, {nb} batches/rank/epoch, world={self.world}, "
                  f"steps {start_step}->{max_steps} (warmup {warmup}), load-time rejects {self.load_rejects}")
        tb = self._tensorboard()
        trainable = [p for p in self.ddp.parameters() if p.requires_grad]
        stream = self._stream(start_step * cfg.grad_accum)
        summary = {"is_main": self.acc.is_main_process, "start_step": start_step, "max_steps": max_steps, "batches_per_epoch": nb,
                   "world_size": self.world, "losses": [], "evals": []}
        n_batches = 0
        totals = {"rejected": 0, "truncated": 0, "tokens": 0, "data_wait_s": 0.0, "step_s": 0.0}
        bar = None
        if cfg.progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.ddp.train()
        step = start_step
        halted = False
        metrics_path = self.out / "metrics.jsonl"
        for step in range(start_step + 1, max_steps + 1):
            t0 = time.perf_counter()
            micro, wait = [], 0.0
            for _ in range(cfg.grad_accum):
                tw = time.perf_counter()
                b = next(stream)
                wait += time.perf_counter() - tw
                micro.append(b)
            n_batches += len(micro)
            n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            n_input = sum(int(b["attention_mask"].sum()) for b in micro)
            stats = torch.tensor([n_local, sum(b["n_rejected"] for b in micro), sum(b["n_truncated"] for b in micro),
                                  n_input],
                                 dtype=torch.float64, device=self.acc.device)
            stats = self.acc.reduce(stats, reduction="sum")
            n_total = float(stats[0])
            if n_total == 0:
                raise RuntimeError(f"step {step}: no target tokens in the accumulation window")
            loss_local = torch.zeros((), dtype=torch.float64, device=self.acc.device)
            for i, b in enumerate(micro):
                b = self._to_device(b)
                sync = contextlib.nullcontext() if i == len(micro) - 1 else self.acc.no_sync(self.ddp)
                with sync:
                    with self.acc.autocast():
                        ls, _ = self.ddp(b["input_ids"], b["attention_mask"], b["emb"], b["labels"])
                    self.acc.backward(ls * (self.world / n_total))
                loss_local += ls.detach().double()
            grad_norm = self.acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(self.acc.reduce(loss_local, reduction="sum")) / n_total
            dt = time.perf_counter() - t0
            totals["rejected"] += int(stats[1])
            totals["truncated"] += int(stats[2])
            totals["tokens"] += int(n_total)
            totals["data_wait_s"] += wait
            totals["step_s"] += dt
            summary["losses"].append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: non-finite loss {loss}")
            rec = {"type": "train", "step": step, "loss": loss, "lr": [g["lr"] for g in optimizer.param_groups],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": int(n_total),
                   "input_tokens": int(stats[3]), "tokens_per_s": n_total / dt, "input_tokens_per_s": float(stats[3]) / dt, "data_wait_s": wait, "step_s": dt, "rejected": int(stats[1]),
                   "truncated": int(stats[2]), "data_epoch": int(micro[-1]["data_epoch"])}
            if self.acc.is_main_process:
                if step % max(1, cfg.log_every) == 0 or step == max_steps or step == start_step + 1:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if tb is not None:
                        tb.add_scalar("train/loss", loss, step)
                        tb.add_scalar("train/tokens_per_s", rec["tokens_per_s"], step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.val_spec is not None and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == max_steps):
                ev = self.evaluate(step)
                summary["evals"].append({k: v for k, v in ev.items() if k != "generations"})
                if self.acc.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({k: v for k, v in ev.items() if k != "generations"}) + "\n")
                    if tb is not None:
                        tb.add_scalar("val/loss", ev["val_loss"], step)
                    self._log(f"step {step}: val_loss={ev['val_loss']:.4f}")
            halt = cfg.halt_at_step > 0 and step == cfg.halt_at_step and step < max_steps
            if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == max_steps or halt:
                self._save(step, optimizer, scheduler)
            if halt:
                halted = True
                self._log(f"halted at step {step} (checkpoint saved); rerun the same command to resume")
                break
        if bar is not None:
            bar.close()
        counts = self.acc.gather(torch.tensor([n_batches], device=self.acc.device)).tolist()
        summary.update({
            "final_step": step if max_steps > start_step else start_step, "halted": halted,
            "batches_per_rank": counts, **totals,
            "stall_fraction": totals["data_wait_s"] / totals["step_s"] if totals["step_s"] > 0 else 0.0,
            "load_rejects": self.load_rejects,
        })
        if not halted:
            export_dir = self.out / "export"
            if self.acc.is_main_process:
                self.write_export(export_dir)
                summary["export_dir"] = str(export_dir)
                summary["post"] = self._post(export_dir)
            self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (self.out / "run_summary.json").write_text(json.dumps(summary, indent=1))
        if tb is not None:
            tb.close()
        self.acc.wait_for_everyone()
        return summary

    def _save(self, step: int, optimizer, scheduler) -> None:
        state = {
            "config_fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "data": {"consumed_batches_per_rank": step * self.cfg.grad_accum,
                     "batches_per_epoch": self.batches_per_epoch, "world_size": self.world},
        }
        save_checkpoint(self.out / "checkpoints", step, model=self.acc.unwrap_model(self.ddp), optimizer=optimizer,
                        scheduler=scheduler, state=state, rank=self.rank, is_main=self.acc.is_main_process,
                        barrier=self.acc.wait_for_everyone)
        if self.acc.is_main_process:
            prune_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)

    def _post(self, export_dir: Path) -> dict:
        reports = {}
        for item in self.cfg.post:
            name, _, spec = item.partition(":")
            pp = get_postprocessor(name)
            ctx = PostContext(
                model=self.acc.unwrap_model(self.ddp), tokenizer=self.tokenizer, config=self.cfg,
                export_dir=export_dir, output_dir=self.out, initial_trainable=self.initial_trainable,
                write_export=self.write_export, log=self._log,
            )
            reports[item] = pp.run(ctx, spec)
        return reports

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.acc.is_main_process):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._log("tensorboard is not installed; --tensorboard ignored (metrics.jsonl is still written)")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


def _shard_list(spec):
    from .data import list_shards

    return list_shards(spec)


def train(cfg: TrainConfig) -> dict:
    """Run one training job (see :class:`Trainer`); returns the run summary."""
    return Trainer(cfg).run()
