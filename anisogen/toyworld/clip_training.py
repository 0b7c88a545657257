"""Contrastive training of the toy CLIP on train-split toy-world scenes (CPU-feasible).

Data: ``n_scenes`` train-split scenes rendered once (uint8, 64 x 64) and, per scene, the seven caption
styles for ``caption_seeds`` seeds, tokenised once. Each step draws ``batch_size`` distinct scenes and one
of their captions at random.

Loss: CLIP's symmetric InfoNCE with *multi-positive* targets. Short captions ("a red star") are true of
many scenes, so in a batch caption j is a positive for every image i it describes
(:func:`~anisogen.toyworld.text.describes_matrix`), and each row's target distribution is uniform over
its positives (the own pair is always one of them). This avoids pushing apart matching pairs.

Optimiser: AdamW (betas 0.9/0.98, eps 1e-6), linear warmup then cosine decay, weight decay on matrices
only; the learnable temperature is clamped at 100 as in CLIP.

CPU economy (exact, not approximations): the text tower is causal and pools at the end-of-text token,
so padding after it never changes an embedding; training encodes captions in length buckets trimmed to
their longest member (:func:`encode_text_trimmed`). Only the ~110 token ids that occur in the captions
get trainable embedding rows (:class:`CompactTokenEmbedding`); the other 49k rows keep their seeded
initial values instead of being touched by every AdamW step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .clip_config import TrainConfig  # defined there, free of torch (train_toyclip.py --help)
from .quality import EvalSet, build_eval_set, encode_text_trimmed, evaluate_clip, pixels_to_tensor
from .render import render_array
from .scenes import sample_scenes
from .text import STYLES, caption_records, describes_matrix, encode_claims, encode_scenes


@dataclass
class TrainData:
    """Cached training data: images (N, 64, 64, 3) uint8, tokens (N, K, L) int32, claims per (scene, k)."""

    images: np.ndarray
    tokens: np.ndarray
    claims: dict = field(repr=False)   # encode_claims arrays, rows ordered scene-major (N * K)
    scenes: dict = field(repr=False)   # encode_scenes arrays (N)


def build_train_data(cfg: TrainConfig, tokenizer, *, cache_dir: str | Path | None = None,
                     progress: bool = True) -> TrainData:
    """Render and tokenise the training set (or read it from ``cache_dir``, keyed by the config)."""
    key = f"toyclip-train-n{cfg.n_scenes}-s{cfg.seed}-k{cfg.caption_seeds}-L{tokenizer.context_length}.npz"
    path = Path(cache_dir) / key if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            claims = {k[2:]: z[k] for k in z.files if k.startswith("c_")}
            scenes = {k[2:]: z[k] for k in z.files if k.startswith("s_")}
            return TrainData(images=z["images"], tokens=z["tokens"], claims=claims, scenes=scenes)
    scenes = sample_scenes(cfg.n_scenes, "train", cfg.seed)
    images = render_array(scenes, progress=progress)
    records = [r for s in scenes for k in range(cfg.caption_seeds) for r in caption_records(s, seed=k)]
    texts = [r.text for r in records]
    toks = []
    it = range(0, len(texts), 8192)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="tokenize", unit="batch")
    for lo in it:
        toks.append(tokenizer(texts[lo:lo + 8192]).numpy().astype(np.int32))
    k = cfg.caption_seeds * len(STYLES)
    tokens = np.concatenate(toks).reshape(len(scenes), k, -1)
    data = TrainData(images=images, tokens=tokens, claims=encode_claims([r.claim for r in records]),
                     scenes=encode_scenes(scenes))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, tokens=tokens, **{f"c_{a}": v for a, v in data.claims.items()},
                 **{f"s_{a}": v for a, v in data.scenes.items()})
        tmp.replace(path)
    return data


class CompactTokenEmbedding(torch.nn.Module):
    """Training stand-in for ``nn.Embedding``: trainable rows for ``used_ids``, frozen rows elsewhere.

    ``forward(ids)`` equals ``nn.Embedding(weight)(ids)`` where ``weight`` is :meth:`full_weight`.
    """

    def __init__(self, embedding: torch.nn.Embedding, used_ids):
        super().__init__()
        used = torch.as_tensor(np.asarray(used_ids), dtype=torch.long).unique()
        full = embedding.weight.detach().clone()
        lut = torch.full((full.shape[0],), -1, dtype=torch.long)
        lut[used] = torch.arange(len(used))
        self.register_buffer("frozen", full, persistent=False)
        self.register_buffer("lut", lut, persistent=False)
        self.register_buffer("used", used, persistent=False)
        self.rows = torch.nn.Parameter(full[used].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        compact = self.lut[ids]
        known = (compact >= 0).unsqueeze(-1)
        return torch.where(known, self.rows[compact.clamp(min=0)], self.frozen[ids])

    def full_weight(self) -> torch.Tensor:
        weight = self.frozen.clone()
        weight[self.used] = self.rows.detach()
        return weight


def export_state_dict(model: torch.nn.Module) -> dict:
    """State dict of ``model`` with a :class:`CompactTokenEmbedding` folded back into ``token_embedding.weight``."""
    state = model.state_dict()
    emb = getattr(model, "token_embedding", None)
    if isinstance(emb, CompactTokenEmbedding):
        state = {k: v for k, v in state.items() if not k.startswith("token_embedding.")}
        state["token_embedding.weight"] = emb.full_weight()
    return state


def _take(enc: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in enc.items()}


def multi_positive_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                             positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets.

    image_emb, text_emb: (B, d) L2-normalised; logit_scale: scalar (already exponentiated);
    positives: (B_image, B_text) bool, ``[i, j]`` = caption j describes image i; every row and column
    needs at least one positive. Returns the mean of the image->text and text->image cross-entropies.
    """
    logits = logit_scale * image_emb @ text_emb.T
    pos = positives.to(logits.dtype)
    t_img = pos / pos.sum(1, keepdim=True)
    t_txt = pos.T / pos.T.sum(1, keepdim=True)
    loss_i = -(t_img * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(t_txt * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_weights(model: torch.nn.Module, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write the state dict as float16 safetensors (integer buffers unchanged), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in export_state_dict(model).items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # package data: world-readable
    tmp.replace(path)
    return path


def train_toyclip(cfg: TrainConfig, out_path: str | Path, *, cache_dir: str | Path | None = None,
                  log: Callable[[dict], None] | None = None, progress: bool = True,
                  eval_data: EvalSet | None = None) -> tuple[torch.nn.Module, dict]:
    """Train a CLIP of architecture ``cfg.model`` from a seeded random init; write ``out_path``.

    The weights are saved (float16 safetensors, with the config and last metrics as metadata) at each
    evaluation and at the end. ``log`` receives dicts (training loss every 25 steps, metrics at each
    evaluation). Returns ``(model, final_metrics)``; final metrics are computed on the float16-rounded
    weights that were saved.
    """
    from ..encode.clip import load_clip

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, _, tokenizer = load_clip(cfg.model, pretrained="random", seed=cfg.seed)
    model.train()
    data = build_train_data(cfg, tokenizer, cache_dir=cache_dir, progress=progress)
    model.token_embedding = CompactTokenEmbedding(model.token_embedding, np.unique(data.tokens))
    if eval_data is None:
        eval_data = build_eval_set(seed=cfg.seed, n_zero_shot=500, n_pairs=cfg.eval_pairs, n_retrieval=1000)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([cfg.seed, 0x7A1])
    n, k = data.tokens.shape[:2]
    log = log or (lambda rec: None)
    meta = {"config": asdict(cfg)}
    t0 = time.time()
    it = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train toyclip", unit="step")
    metrics: dict = {}
    running = []
    for step in it:
        idx = rng.choice(n, cfg.batch_size, replace=False)
        cap = rng.integers(k, size=cfg.batch_size)
        rows = idx * k + cap
        pos = describes_matrix(_take(data.claims, rows), _take(data.scenes, idx)).T  # (img, txt)
        if not np.all(np.diag(pos)):
            raise AssertionError("a caption does not describe its own scene; caption generator bug")
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        images = pixels_to_tensor(data.images[idx])
        tokens = torch.from_numpy(data.tokens[idx, cap].astype(np.int64))
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(encode_text_trimmed(model, tokens), dim=-1)
        scale = model.logit_scale.exp()
        loss = multi_positive_clip_loss(img, txt, scale, torch.from_numpy(pos))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running.append(float(loss.detach()))
        if (step + 1) % 25 == 0:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "lr": _lr_at(step, cfg),
                   "logit_scale": float(scale.detach()), "elapsed_s": round(time.time() - t0, 1)}
            running = []
            log(rec)
            if progress:
                it.set_postfix(loss=f"{rec['loss']:.3f}")
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            metrics = evaluate_clip(model, tokenizer, eval_data)
            model.train()
            log({"step": step + 1, "eval": metrics, "elapsed_s": round(time.time() - t0, 1)})
            save_weights(model, out_path, metadata={**meta, "metrics": metrics, "step": step + 1})
    train_seconds = time.time() - t0
    save_weights(model, out_path, metadata={**meta, "step": cfg.steps, "train_seconds": round(train_seconds, 1)})
    final, _, tokenizer = load_clip(cfg.model, pretrained=str(out_path))
    metrics = evaluate_clip(final, tokenizer, eval_data)
    metrics["train_seconds"] = round(train_seconds, 1)
    save_weights(final, out_path, metadata={**meta, "metrics": metrics, "step": cfg.steps,
                                            "train_seconds": round(train_seconds, 1)})
    log({"step": cfg.steps, "final": metrics, "elapsed_s": round(time.time() - t0, 1)})
    return final, metrics
