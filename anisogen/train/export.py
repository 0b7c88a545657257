"""Exports: the self-contained result of training, and loading it for inference in one call.

Layout of ``export/``::

    config.json             format/version, LM spec, projector description, template, placeholder,
                            embedding normalisation, CLIP fingerprint, aligner, method (+ its info)
    projector.safetensors   projector weights (LLaVA key layout for mlp2x_gelu: 0.weight ... 2.bias)
    adapter/                PEFT adapter (LoRA-based methods), standard save_pretrained layout
    extras.safetensors      modules methods attached under ``model.extras`` (when any)
    lm/                     the LM itself, only when it cannot be rebuilt from its spec (the random
                            tiny test LM) or when the method trained its weights (``full``)
    tokenizer/              the tokenizer, including the ``<image>`` placeholder token

``load_export(path)`` returns an :class:`ExportedModel` with ``generate(embeddings)`` and
``caption_loss(embeddings, captions)``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from .data import EmbeddingTransform, decode_embedding
from .model import EmbeddingLM
from .projector import projector_from_description
from .templates import IMAGE_MARKER, caption_conversation, get_template
from ..cli import UserError

EXPORT_FORMAT = "anisogen-embedding-lm"
EXPORT_VERSION = 1


def write_export(
    out_dir: Path,
    *,
    model: EmbeddingLM,
    tokenizer,
    config: dict,
    method,
    method_info: dict,
    base_lm_dir: Path | None = None,
    projector_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an export atomically (``.tmp`` sibling, then rename) and return its path.

    ``config`` must contain ``lm`` (load_lm info), ``template``, ``normalization``, ``provenance``,
    ``max_length``. ``base_lm_dir``: a saved copy of the untrained LM to ship (tiny LM).
    ``projector_state`` overrides the projector weights written (used by post-processors such as APP).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    proj = projector_state if projector_state is not None else model.projector.state_dict()
    save_file({k: v.detach().cpu().float().contiguous() for k, v in proj.items()}, str(tmp / "projector.safetensors"))
    lm_saved = False
    if method.trains_lm_weights:
        model.lm.save_pretrained(str(tmp / "lm"), safe_serialization=True)
        lm_saved = True
    elif base_lm_dir is not None:
        shutil.copytree(base_lm_dir, tmp / "lm")
        lm_saved = True
    if method.export is not None:
        method.export(model, tmp, method_info)
    extras = {k: v.detach().cpu().contiguous() for k, v in model.extras.state_dict().items()}
    if extras:
        save_file(extras, str(tmp / "extras.safetensors"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    full = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "anisogen_version": __version__,
        **config,
        "lm_saved_in_export": lm_saved,
        "projector": model.projector.describe(),
        "vectors_per_sample": model.vectors_per_sample,
        "image_token": IMAGE_MARKER,
        "image_token_id": model.image_token_id,
        "method": method.name,
        "method_info": method_info,
    }
    (tmp / "config.json").write_text(json.dumps(full, indent=2, sort_keys=True))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class ExportedModel:
    """A loaded export: ``model`` (EmbeddingLM, eval mode), ``tokenizer``, ``template``,
    ``transform`` (the stored normalisation) and ``config`` (config.json)."""

    model: EmbeddingLM
    tokenizer: Any
    template: Any
    transform: EmbeddingTransform
    config: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.projector.parameters()).device

    def _emb_tensor(self, embeddings) -> torch.Tensor:
        arr = np.asarray(embeddings.detach().cpu().numpy() if torch.is_tensor(embeddings) else embeddings)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3:
            raise ValueError(f"embeddings must be (d,), (N, d) or (N, n, d), got {arr.shape}")
        want = (self.model.vectors_per_sample, self.model.projector.d_in)
        if tuple(arr.shape[1:]) != want:
            raise ValueError(f"embeddings have per-sample shape {tuple(arr.shape[1:])}; this export expects {want}")
        rows = [self.transform(decode_embedding(a, name=f"embedding {i}"), train=False) for i, a in enumerate(arr)]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def _conversation(self, prompt: str | None, answer: str | None = None) -> list[dict]:
        p = self.config.get("default_prompt", "") if prompt is None else prompt
        conv = caption_conversation(answer if answer is not None else "", p)
        return conv if answer is not None else conv[:1]

    def generate(
        self, embeddings, *, prompt: str | None = None, conversations: Sequence[list] | None = None,
        max_new_tokens: int = 48, batch_size: int = 16, **gen_kwargs,
    ) -> list[str]:
        """Greedy texts for (N, d) embeddings. ``prompt``: the user instruction under chat templates
        (default: the one used in training). ``conversations``: per-sample message lists ending with a
        user turn (overrides ``prompt``; each must contain ``<image>``)."""
        from .data import Collator

        emb = self._emb_tensor(embeddings)
        n = emb.shape[0]
        convs = list(conversations) if conversations is not None else [self._conversation(prompt)] * n
        if len(convs) != n:
            raise ValueError(f"{len(convs)} conversations for {n} embeddings")
        collate = Collator(self.tokenizer.pad_token_id, padding_side="left")
        out: list[str] = []
        self.model.eval()
        for s in range(0, n, batch_size):
            exs = []
            for conv in convs[s:s + batch_size]:
                enc = self.template.encode(conv, self.tokenizer, image_token_id=self.model.image_token_id,
                                           num_image_tokens=self.model.num_visual_tokens, for_generation=True)
                exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels,
                            "truncated": False, "reference": ""})
            b = collate(exs)
            ids = self.model.generate(
                b["input_ids"].to(self.device), b["attention_mask"].to(self.device), emb[s:s + batch_size],
                max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id, **gen_kwargs,
            )
            out += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out

    @torch.no_grad()
    def caption_loss(self, embeddings, captions: Sequence[str], *, prompt: str | None = None,
                     batch_size: int = 16) -> dict:
        """Mean per-token cross-entropy (nats) of ``captions`` given their embeddings, under the
        export's template. Returns ``{"loss", "tokens", "per_sample"}`` (per_sample: mean CE per caption)."""
        from .data import Collator

        emb = self._emb_tensor(embeddings)
        if len(captions) != emb.shape[0]:
            raise ValueError(f"{len(captions)} captions for {emb.shape[0]} embeddings")
        collate = Collator(self.tokenizer.pad_token_id)
        total, count, per = 0.0, 0, []
        self.model.eval()
        for s in range(0, len(captions), batch_size):
            exs = []
            for cap in captions[s:s + batch_size]:
                enc = self.template.encode(self._conversation(prompt, cap), self.tokenizer,
                                           image_token_id=self.model.image_token_id,
                                           num_image_tokens=self.model.num_visual_tokens,
                                           max_length=self.config.get("max_length"))
                exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels,
                            "truncated": enc.truncated, "reference": cap})
            b = collate(exs)
            out = self.model(b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                             emb[s:s + batch_size])
            logits = out.logits.float()
            labels = b["labels"].to(self.device)
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
            m = (labels[:, 1:] != -100)
            sums, cnts = (lp * m).sum(1), m.sum(1)
            per += (sums / cnts.clamp(min=1)).tolist()
            total += float(sums.sum())
            count += int(cnts.sum())
        return {"loss": total / max(count, 1), "tokens": count, "per_sample": per}


def load_export(path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ExportedModel:
    """Load an export directory for inference (one call). ``dtype`` applies to the LM (default fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lm import load_lm
    from .methods import get_method

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not an export (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != EXPORT_FORMAT:
        raise UserError(f"{cfg_file}: not an anisogen export (format={cfg.get('format')!r})")
    dtype = dtype or torch.float32
    if cfg.get("lm_saved_in_export"):
        lm = AutoModelForCausalLM.from_pretrained(str(path / "lm"), dtype=dtype)
    else:
        lm, _, _ = load_lm(cfg["lm"]["spec"], dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.convert_tokens_to_ids(cfg["image_token"]) != cfg["image_token_id"]:
        raise ValueError(f"{path}: tokenizer placeholder id differs from config.json image_token_id")
    projector = projector_from_description(cfg["projector"])
    projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    model = EmbeddingLM(lm, projector, cfg["image_token_id"], cfg["vectors_per_sample"])
    method = get_method(cfg["method"])
    if method.load is not None:
        method.load(model, path, cfg)
    if (path / "extras.safetensors").is_file():
        model.extras.load_state_dict(load_file(str(path / "extras.safetensors")))
    model.to(device)
    model.eval()
    # exports written before the image prefix existed keep their layout ("legacy": BOS only when the
    # tokenizer prepends it)
    template = get_template(cfg["template"], image_prefix=cfg.get("image_prefix", "legacy"))
    return ExportedModel(model, tokenizer, template,
                         EmbeddingTransform.from_description(cfg["normalization"]), cfg)
