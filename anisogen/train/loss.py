"""Memory-lean causal-LM loss: next-token cross-entropy without the (B, T, V) logits tensor.

A causal LM's head turns the last hidden states (B, T, H) into logits (B, T, V). With V around 150k,
B=16 and T=2048 the bf16 logits alone take 10 GB and their fp32 copy for the loss another 20 GB, although
most positions of a stage-1/2 batch (prompt, placeholders, padding) carry no target at all.

:func:`chunked_causal_lm_loss_sum` computes the same sum as
:func:`anisogen.train.model.causal_lm_loss_sum` but

1. keeps only the positions that have a target (label != -100 one step later),
2. runs the head on ``chunk_tokens`` of them at a time, upcasting that chunk's logits to fp32, and
3. wraps each chunk in a non-reentrant activation checkpoint, so no chunk's logits are kept for the
   backward pass: they are recomputed there, one chunk at a time.

Peak extra memory is therefore about ``chunk_tokens * V * 12`` bytes (bf16 logits, fp32 logits and their
gradient for one chunk) instead of ``B * T * V * (2 + 4 + 4)``; the price is one more head matmul per
target token in the backward pass, while the head matmul for non-target positions disappears.

:func:`lm_head_parts` finds, inside an HF causal LM (possibly a PEFT model), the decoder that yields the
last hidden states, the output-embedding module and the post-head logit transform of its config (Gemma
soft-capping, Cohere/Granite/MiniCPM3/Falcon-H1 scaling). The head is always *called as a module*, so tied
embeddings, bias-free or biased heads, PEFT-wrapped heads (LoRA on ``lm_head``, ``modules_to_save``) and
DeepSpeed ZeRO-3 parameter gathering all work unchanged. Architectures whose head does something else
must be refused; :func:`verify_chunked_head` compares both paths numerically on a short random input
for any other architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .templates import IGNORE_INDEX

#: Target tokens per chunk: 1024 x 152k vocabulary = 0.6 GB of fp32 logits per chunk.
DEFAULT_CHUNK_TOKENS = 1024


class ChunkedLossUnsupported(ValueError):
    """The LM's head cannot be reproduced outside its ``forward`` (use the full-logits path)."""


@dataclass(frozen=True)
class LogitTransform:
    """What an HF causal-LM ``forward`` does to ``lm_head(hidden)`` before the loss.

    ``logits = softcap * tanh(scale * logits / softcap)`` when ``softcap`` is set, else ``scale * logits``;
    applied in fp32 (HF applies it in the model dtype, so bf16 models differ by bf16 rounding only).
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform_for(config) -> LogitTransform:
    """The post-head transform implied by an HF config (text config of composite models).

    Handled: ``final_logit_softcapping`` (Gemma 2/3/3n/4: ``tanh`` capping), ``logit_scale`` (Cohere:
    multiply), ``logits_scaling`` (Granite: divide logits; MiniCPM3: divide the hidden states, the same
    for a bias-free head), ``lm_head_multiplier`` (Falcon-H1: multiply). Raises
    :class:`ChunkedLossUnsupported` for a non-finite or zero value.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    for name, op in (("logit_scale", "mul"), ("logits_scaling", "div"), ("lm_head_multiplier", "mul")):
        value = getattr(config, name, None)
        if value is None:
            continue
        value = float(value)
        if not math.isfinite(value) or value == 0.0:
            raise ChunkedLossUnsupported(f"config.{name}={value} is not a usable logit scale")
        scale = scale * value if op == "mul" else scale / value
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = float(softcap)
        if not math.isfinite(softcap) or softcap <= 0:
            raise ChunkedLossUnsupported(f"config.final_logit_softcapping={softcap} is not a usable soft cap")
    return LogitTransform(scale=scale, softcap=softcap)


def _peft_base(lm: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it); ``lm`` otherwise."""
    if hasattr(lm, "peft_config") and hasattr(lm, "get_base_model"):
        cfg = getattr(lm, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            raise ChunkedLossUnsupported(
                "PEFT prompt-learning adapters add virtual tokens in PeftModel.forward; the decoder cannot be "
                "called on its own")
        return lm.get_base_model()
    return lm


@dataclass
class LMHeadParts:
    """``decoder(inputs_embeds=..., attention_mask=..., use_cache=False)`` returns the last hidden states
    (after the final norm) whose ``transform(head(h))`` equals the causal LM's logits."""

    decoder: nn.Module
    head: nn.Module
    transform: LogitTransform


def lm_head_parts(lm: nn.Module) -> LMHeadParts:
    """Split an HF causal LM (or a PEFT model around one) into decoder, output embeddings and transform.

    The decoder is found with ``get_base_model()`` (PEFT), then ``get_decoder()`` (transformers' lookup:
    ``.model`` for Llama/Qwen2/Gemma/Mistral..., ``.language_model``/``.decoder`` for wrappers); the head
    with ``get_output_embeddings()``. Raises :class:`ChunkedLossUnsupported` when either is missing,
    when ``get_decoder()`` returns the causal LM itself, or for a prompt-learning PEFT model.
    """
    base = _peft_base(lm)
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        raise ChunkedLossUnsupported(f"{type(base).__name__} has no get_decoder/get_output_embeddings")
    decoder, head = get_decoder(), get_head()
    if decoder is None or decoder is base:
        raise ChunkedLossUnsupported(f"could not find the decoder of {type(base).__name__}")
    if head is None:
        raise ChunkedLossUnsupported(f"{type(base).__name__} has no output embeddings")
    return LMHeadParts(decoder=decoder, head=head, transform=logit_transform_for(base.config))


def last_hidden_state(decoder: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      **kwargs) -> torch.Tensor:
    """Run ``decoder`` (from :func:`lm_head_parts`) without a KV cache; return (B, T, H)."""
    out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None else hidden


def _head_fn(head) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(head, nn.Module):
        return head
    if isinstance(head, torch.Tensor):
        return lambda h: F.linear(h, head)
    if isinstance(head, tuple) and len(head) == 2:  # (weight, bias)
        return lambda h: F.linear(h, head[0], head[1])
    raise TypeError(f"head must be an nn.Module, a (V, H) weight or a (weight, bias) pair, got {type(head).__name__}")


def _chunk_ce_sum(head, transform: LogitTransform, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = transform(head(h).float())
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss_sum(
    hidden: torch.Tensor,
    lm_head_weight_or_module,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of shifted next-token cross-entropy (fp32) over labels != -100, and the number of targets.

    Same value and gradients as ``causal_lm_loss_sum(transform(head(hidden)), labels)`` without ever
    holding more than ``chunk_tokens`` rows of logits, in the forward or the backward pass.

    Args:
        hidden: (B, T, H) last hidden states (after the final norm), any float dtype.
        lm_head_weight_or_module: the output embeddings as a module (preferred: called on (n, H) rows, so
            LoRA/ZeRO-3/biases work), a (V, H) weight, or a ``(weight, bias)`` pair.
        labels: (B, T) int64, -100 where no loss; position t+1's label is the target of position t.
        chunk_tokens: target rows per head call (> 0).
        logit_transform: post-head transform (see :func:`logit_transform_for`); identity if None.
    Returns:
        ``(loss_sum, n_targets)``: fp32 scalar (0 with a graph when there is no target, so every head
        parameter still takes part in backward) and an int64 scalar on ``labels``' device.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must be (B, T, H) and (B, T)")
    head = _head_fn(lm_head_weight_or_module)
    transform = logit_transform or LogitTransform()
    shift_labels = labels[:, 1:].to(hidden.device)
    keep = shift_labels != IGNORE_INDEX
    n_targets = keep.sum()
    b_idx, t_idx = keep.nonzero(as_tuple=True)
    h = hidden[b_idx, t_idx]  # (N, H): only positions that predict a target
    y = shift_labels[b_idx, t_idx]
    total = hidden.new_zeros((), dtype=torch.float32)
    n = h.shape[0]
    use_ckpt = torch.is_grad_enabled()
    for start in range(0, max(n, 1), chunk_tokens):  # one (possibly empty) chunk when n == 0
        hc, yc = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        if use_ckpt:
            part = checkpoint(_chunk_ce_sum, head, transform, hc, yc, use_reentrant=False)
        else:
            part = _chunk_ce_sum(head, transform, hc, yc)
        total = total + part
    return total, n_targets.to(labels.device)


def verify_chunked_head(lm: nn.Module, *, tokens: int = 12, chunk_tokens: int = 5, rtol: float = 1e-3,
                        seed: int = 0) -> float:
    """Check on a short random sequence that :func:`lm_head_parts` + :func:`chunked_causal_lm_loss_sum`
    reproduce ``lm(...).logits`` + the reference loss for this architecture; return the relative error.

    Runs two tiny forward passes without gradients on the LM's device (call it on a materialised LM,
    before wrapping it for FSDP/ZeRO-3). Raises :class:`ChunkedLossUnsupported` when the LM cannot be
    split, ``AssertionError`` when the two losses differ by more than ``rtol``.
    """
    from .model import causal_lm_loss_sum

    parts = lm_head_parts(lm)
    table = lm.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, table.weight.shape[0], (1, tokens), generator=g).to(table.weight.device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : tokens // 3] = IGNORE_INDEX
    with torch.no_grad():
        embeds = table(ids)
        ref, _ = causal_lm_loss_sum(lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits, labels)
        hidden = last_hidden_state(parts.decoder, embeds, mask)
        got, _ = chunked_causal_lm_loss_sum(hidden, parts.head, labels, chunk_tokens=chunk_tokens,
                                            logit_transform=parts.transform)
    rel = abs(float(got) - float(ref)) / max(abs(float(ref)), 1e-12)
    assert rel <= rtol, f"chunked loss {float(got)} != full-logits loss {float(ref)} for {type(lm).__name__}"
    return rel
