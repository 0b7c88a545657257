"""``EmbeddingLM``: a causal LM conditioned on CLIP-space embeddings through a projector.

The projected embedding replaces the input embeddings of ``k`` reserved placeholder tokens
(``masked_scatter``, the HF ``Llava*`` style), so train, eval and generate share one code path
(:meth:`EmbeddingLM.embed`) and labels/attention masks never need re-splicing.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .loss import (DEFAULT_CHUNK_TOKENS, ChunkedLossUnsupported, chunked_causal_lm_loss_sum, last_hidden_state,
                   lm_head_parts)
from .projector import Projector
from .templates import IGNORE_INDEX


class PlaceholderMismatch(ValueError):
    """The number of placeholder tokens in a row differs from the number of projected tokens."""


class EmbeddingLM(nn.Module):
    """Wrap ``lm`` (an HF causal LM, possibly a PEFT model) and a :class:`Projector`.

    Args:
        lm: ``AutoModelForCausalLM``-like module accepting ``inputs_embeds``.
        projector: maps (B, n, d_in) embeddings to (B, num_visual_tokens, H).
        image_token_id: the reserved placeholder id; it may lie outside the LM vocabulary (it is
            mapped to id 0 for the embedding lookup and then overwritten).
        vectors_per_sample: n, the number of embedding vectors per sample (1 for ``emb.npy`` of shape (d,)).

    ``extras`` is an ``nn.ModuleDict`` where methods (e.g. steering interventions) attach trainable
    modules so that DDP, checkpoints and exports see them. Methods that act on visual positions inside
    the LM (e.g. MoReS) learn them through :meth:`register_visual_mask_hook`.
    """

    def __init__(self, lm: nn.Module, projector: Projector, image_token_id: int, vectors_per_sample: int = 1):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.extras = nn.ModuleDict()
        self.image_token_id = int(image_token_id)
        self.vectors_per_sample = int(vectors_per_sample)
        self._visual_mask_hooks: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()

    def register_visual_mask_hook(self, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``fn(visual_mask)`` on every :meth:`embed`, i.e. before each LM call of :meth:`forward`
        and :meth:`generate` (and of callers that run ``embed`` then ``lm`` themselves).

        ``visual_mask`` is the (B, T) bool placeholder mask of that call (any padding side), passed
        after the placeholder counts were validated. Hooks run in registration order. Returns a handle
        whose ``remove()`` unregisters ``fn``.
        """
        handle = RemovableHandle(self._visual_mask_hooks)
        self._visual_mask_hooks[handle.id] = fn
        return handle

    def tie_weights(self, **kwargs) -> None:
        """Re-tie the LM's input and output embeddings (through PEFT wrappers). accelerate's FSDP2
        loading moves the model to the meta device, which unties shared parameters, and then calls
        this; without it rank 0 (real weights, untied by the move) and a meta-loaded rank (still tied)
        would shard different parameter sets."""
        fn = getattr(self.lm, "tie_weights", None)
        if fn is not None:
            fn(**kwargs)

    @property
    def _no_split_modules(self) -> list[str]:
        """The LM's decoder-layer class names (through PEFT wrappers): what FSDP's transformer-based
        auto-wrap shards as units when the accelerate config names no layer class."""
        lm = self.lm
        for _ in range(3):
            names = getattr(lm, "_no_split_modules", None)
            if names:
                return list(names)
            lm = getattr(lm, "base_model", None) or getattr(lm, "model", None)
            if lm is None:
                break
        return []

    @property
    def num_visual_tokens(self) -> int:
        """Placeholder tokens per sample: vectors_per_sample * projector.tokens_per_vector."""
        return self.vectors_per_sample * self.projector.tokens_per_vector

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().weight.shape[1]

    def freeze_lm(self) -> None:
        """Set ``requires_grad=False`` on every LM parameter."""
        for p in self.lm.parameters():
            p.requires_grad_(False)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool mask of placeholder positions."""
        return input_ids == self.image_token_id

    def embed(self, input_ids: torch.Tensor, emb: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with projected ``emb`` scattered into the placeholders.

        Args:
            input_ids: (B, T) int64, each image row holding exactly ``num_visual_tokens`` placeholders.
            emb: (B, d_in) or (B, n, d_in) float embeddings (already normalised by the data pipeline).
            has_image: (B,) bool; False marks a text-only row, which must hold no placeholder (its
                ``emb`` row is projected but not used). None: every row has an image.
        Returns:
            (B, T, H) in the LM's embedding dtype.
        Raises:
            PlaceholderMismatch if a row's placeholder count differs from the projected token count
            (0 for text-only rows).

        The projector always runs on the whole batch, so its parameters are in the autograd graph (zero
        gradient) even when no row has an image: DDP/FSDP with ``find_unused_parameters=False`` cannot
        hang on a text-only batch.
        """
        mask = self.visual_mask(input_ids)
        counts = mask.sum(dim=1)
        want = self.num_visual_tokens
        if emb.dim() == 2:
            emb = emb[:, None, :]
        if emb.shape[0] != input_ids.shape[0]:
            raise PlaceholderMismatch(f"{emb.shape[0]} embeddings for a batch of {input_ids.shape[0]} sequences")
        if emb.shape[1] != self.vectors_per_sample:
            raise PlaceholderMismatch(
                f"got {emb.shape[1]} embedding vectors per sample, the model expects {self.vectors_per_sample}"
            )
        expected = torch.full_like(counts, want)
        if has_image is not None:
            if tuple(has_image.shape) != (input_ids.shape[0],):
                raise PlaceholderMismatch(
                    f"has_image has shape {tuple(has_image.shape)}, expected ({input_ids.shape[0]},)")
            has_image = has_image.to(device=counts.device, dtype=torch.bool)
            expected = expected * has_image
        bad = torch.nonzero(counts != expected).flatten()
        if bad.numel():
            row = int(bad[0])
            if int(expected[row]) == 0:
                raise PlaceholderMismatch(
                    f"row {row} is text-only (has_image False) but has {int(counts[row])} image placeholder tokens "
                    f"(id {self.image_token_id}) ({int(bad.numel())} bad rows)"
                )
            raise PlaceholderMismatch(
                f"row {row} has {int(counts[row])} image placeholder tokens (id {self.image_token_id}) but the "
                f"projector makes {want} visual tokens per sample ({int(bad.numel())} bad rows)"
            )
        for fn in self._visual_mask_hooks.values():
            fn(mask)
        table = self.lm.get_input_embeddings()
        embeds = table(input_ids.masked_fill(mask, 0))
        proj_dtype = next(self.projector.parameters()).dtype
        feats = self.projector(emb.to(proj_dtype))  # whole batch: the projector stays in the graph
        if has_image is not None:
            feats = feats[has_image.to(feats.device)]  # masked_scatter fills placeholders in row order
        return embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))

    #: Target tokens per chunk of the cross-entropy with labels; 0 = full (B, T, V) logits.
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ):
        """Run the LM. With ``labels`` return ``(loss_sum, n_targets)``: the fp32 *sum* of next-token
        cross-entropy over label positions != -100 and their count (int64 scalar tensor), so the caller
        can normalise by target tokens across an accumulation window and across ranks. Without labels,
        return the HF model output (logits (B, T, V)).

        With labels and ``loss_chunk_tokens > 0`` the LM's decoder runs alone and the loss comes from
        :func:`~anisogen.train.loss.chunked_causal_lm_loss_sum` (logits only for target positions,
        ``loss_chunk_tokens`` rows at a time, never all at once); ``loss_chunk_tokens = 0``, or an LM
        whose head cannot be split off (warned once), materialises the full (B, T, V) logits.
        """
        inputs_embeds = self.embed(input_ids, emb, has_image)
        if labels is not None and self.loss_chunk_tokens > 0:
            try:
                parts = lm_head_parts(self.lm)
            except ChunkedLossUnsupported as e:
                if not getattr(self, "_warned_chunked_loss", False):
                    warnings.warn(f"chunked cross-entropy unavailable ({e}); computing full logits", stacklevel=2)
                    self._warned_chunked_loss = True
            else:
                hidden = last_hidden_state(parts.decoder, inputs_embeds, attention_mask)
                return chunked_causal_lm_loss_sum(hidden, parts.head, labels, chunk_tokens=self.loss_chunk_tokens,
                                                  logit_transform=parts.transform)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        if labels is None:
            return out
        return causal_lm_loss_sum(out.logits, labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, emb: torch.Tensor,
                 has_image: torch.Tensor | None = None, **gen_kwargs):
        """Greedy (by default) generation conditioned on ``emb``; prompts must be LEFT-padded.

        Returns the (B, new_tokens) generated ids (prompt excluded).
        """
        inputs_embeds = self.embed(input_ids, emb, has_image)
        gen_kwargs.setdefault("do_sample", False)
        return self.lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **gen_kwargs)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Named parameters with ``requires_grad`` (detached), i.e. exactly what a checkpoint holds."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of shifted next-token CE (float32) over labels != -100, and the number of such targets."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    n = (shift_labels != IGNORE_INDEX).sum()
    return loss_sum, n
