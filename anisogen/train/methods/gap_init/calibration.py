"""Gap-Init calibration: per-layer text / visual hidden-state means through forward hooks (§4.2, G.4).

In ``separate`` mode (paper Alg. 1) each sample is encoded twice: ``prefix + target text`` and
``prefix + <image> placeholders``. The prefix is what the run's template puts before ``<image>``
(:func:`calibration_prefix`): never nothing, since position 0 of a causal LM holds the attention-sink
state, whose hidden states say nothing about the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..layers import block_hidden, decoder_layers

IGNORE_INDEX = -100


def calibration_prefix(prefix_ids: Sequence[int] = (), tokenizer=None) -> list[int]:
    """Tokens put before each isolated calibration sequence.

    ``prefix_ids`` (the template's ids right before ``<image>``) when given; else ``[BOS]`` when the
    tokenizer has one; else a ``ValueError``: the first token of a sequence is the attention sink, and
    calibrating there would measure the sink instead of the image.
    """
    if prefix_ids:
        return [int(x) for x in prefix_ids]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return [int(bos)]
    raise ValueError("gap_init calibration needs a prefix before <image>: the template gave none and the tokenizer "
                     "has no BOS, so the visual mean would be measured at position 0 (the attention-sink state); "
                     "give the template an image prefix or use --opt calib_mode=joint")


@torch.no_grad()
def masked_layer_means(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    layers: Sequence[int] | None = None,
    *,
    point: str = "output",
) -> dict[str, torch.Tensor]:
    """Per-sample means of decoder hidden states over masked positions, captured by forward hooks.

    Args:
        lm: HF causal LM (or PEFT model) accepting ``inputs_embeds``.
        inputs_embeds: (B, T, H). attention_mask: (B, T) 0/1 (either padding side).
        masks: name -> (B, T) bool; every row of every mask needs >= 1 position.
        layers: decoder-layer indices (default: all).
        point: ``output`` (decoder block output, the residual stream after block l; default) or
            ``input`` (block input; a forward pre-hook).
    Returns:
        name -> (B, len(layers), H) float64 CPU tensor of per-row means.
    """
    blocks = decoder_layers(lm)
    layers = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    for name, m in masks.items():
        if m.shape != attention_mask.shape:
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, expected {tuple(attention_mask.shape)}")
    masks = {k: (v.bool() & attention_mask.bool()).to(inputs_embeds.device) for k, v in masks.items()}
    for name, m in masks.items():
        empty = torch.nonzero(m.sum(1) == 0).flatten()
        if empty.numel():
            raise ValueError(f"mask {name!r}: row {int(empty[0])} selects no (unpadded) position")
    weights = {k: (m.double() / m.sum(1, keepdim=True).double()) for k, m in masks.items()}
    out = {k: torch.zeros(inputs_embeds.shape[0], len(layers), inputs_embeds.shape[-1], dtype=torch.float64)
           for k in masks}

    def record(slot: int, h: torch.Tensor):
        hd = h.double()
        for k, w in weights.items():
            out[k][:, slot] = torch.einsum("bt,bth->bh", w, hd).cpu()

    handles = []
    try:
        for slot, li in enumerate(layers):
            if point == "output":
                handles.append(blocks[li].register_forward_hook(
                    lambda mod, args, o, slot=slot: record(slot, block_hidden(o))))
            elif point == "input":
                handles.append(blocks[li].register_forward_pre_hook(
                    lambda mod, args, kwargs, slot=slot: record(slot, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            else:
                raise ValueError(f"point must be 'output' or 'input', got {point!r}")
        lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


@dataclass
class GapStats:
    """Per-sample layer means from calibration.

    ``text``/``visual``: (N, L, H) float64, the mean over the sample's text / visual positions at each
    of ``layers`` (decoder-layer indices). ``source``/``mode``/``point`` are recorded in reports.
    """

    layers: list[int]
    text: torch.Tensor
    visual: torch.Tensor
    source: str = "train"
    mode: str = "separate"
    point: str = "output"

    @property
    def num_samples(self) -> int:
        return int(self.text.shape[0])

    def gaps(self) -> dict[int, torch.Tensor]:
        """layer -> g_l = mean_i text_i - mean_i visual_i, (H,) float64."""
        g = self.text.mean(0) - self.visual.mean(0)
        return {li: g[j].clone() for j, li in enumerate(self.layers)}

    def describe(self) -> dict:
        g = self.gaps()
        return {"layers": self.layers, "num_samples": self.num_samples, "source": self.source, "mode": self.mode,
                "point": self.point, "gap_norms": {str(k): float(v.norm()) for k, v in g.items()}}


def _pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    am = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, : len(r)] = 1
    return ids, am


@torch.no_grad()
def collect_gap_stats(
    lm: nn.Module,
    embed_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Mapping],
    *,
    image_token_id: int,
    num_visual_tokens: int,
    pad_id: int = 0,
    prefix_ids: Sequence[int] = (),
    layers: Sequence[int] | None = None,
    mode: str = "separate",
    point: str = "output",
    max_samples: int | None = 256,
    source: str = "train",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> GapStats:
    """Calibrate per-layer text / visual means on collated batches.

    Args:
        lm: HF causal LM (frozen; put in eval mode here and restored afterwards).
        embed_fn: ``(input_ids (B,T), emb (B,n,d)) -> inputs_embeds (B,T,H)`` scattering the projected
            embedding into the ``image_token_id`` placeholders (``EmbeddingLM.embed``).
        batches: dicts with ``input_ids`` (B,T), ``attention_mask`` (B,T), ``labels`` (B,T; -100 off
            target) and ``emb`` (B,n,d) -- the trainer's collated batches. The *text* of a sample is
            its target tokens (the caption / answer paired with the embedding). An optional
            ``has_image`` (B,) bool marks text-only conversations (False); those rows are skipped
            (a missing key means every row has an image).
        image_token_id, num_visual_tokens: placeholder id and count per sample.
        pad_id: id used to pad the rebuilt sequences (masked out; any id works).
        prefix_ids: tokens put before each isolated sequence in ``separate`` mode (what the template
            puts before ``<image>``, e.g. BOS; see :func:`calibration_prefix`); never averaged. Required
            in ``separate`` mode: without it the first text / visual token sits at position 0, the
            attention-sink state.
        layers: decoder layers to measure (default all).
        mode: ``separate`` (default; paper Alg. 1: text and visual encoded in two passes,
            ``prefix + text`` and ``prefix + placeholders``) or ``joint`` (the training sequence
            itself: visual = placeholder positions, text = target positions).
        point: ``output`` | ``input`` (see :func:`masked_layer_means`).
        max_samples: stop after this many samples (paper default 256); None = all.
        source: recorded label of where the embeddings come from (``train`` substitutes, ``real``...).
    Returns:
        :class:`GapStats`.
    """
    if mode not in ("separate", "joint"):
        raise ValueError(f"calibration mode must be 'separate' or 'joint', got {mode!r}")
    pre = [int(x) for x in prefix_ids]
    if mode == "separate" and not pre:
        raise ValueError("separate-mode calibration needs prefix_ids (e.g. BOS or the template's tokens before "
                         "<image>); "
                         "without them the means would be taken at position 0, the attention-sink state")
    was_training = lm.training
    lm.eval()
    if device is None:
        device = next(lm.parameters()).device
    texts, visuals, seen = [], [], 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="gap calibration", unit="batch")
    try:
        for bi, b in enumerate(it):
            ids = b["input_ids"]
            labels = b["labels"]
            emb = b["emb"]
            if emb is None:
                raise ValueError(f"calibration batch {bi} carries no embeddings")
            am = b["attention_mask"]
            keys = b.get("keys")
            rows = torch.arange(ids.shape[0])
            has_image = b.get("has_image")
            if has_image is not None:
                rows = rows[torch.as_tensor(has_image, dtype=torch.bool).cpu()]  # text-only rows carry no image
            if max_samples is not None:
                if max_samples - seen <= 0:
                    break
                rows = rows[: max_samples - seen]
            if rows.numel() == 0:
                continue
            ids, labels, emb, am = ids[rows], labels[rows], emb[rows], am[rows]
            tgt = labels != IGNORE_INDEX
            no_text = torch.nonzero(tgt.sum(1) == 0).flatten()
            if no_text.numel():
                row = int(rows[int(no_text[0])])
                who = f"key {keys[row]!r}" if keys else f"row {row}"
                raise ValueError(f"calibration batch {bi}, {who}: no target (text) tokens to average")
            if mode == "joint":
                vis = ids == image_token_id
                inp = embed_fn(ids.to(device), emb.to(device))
                means = masked_layer_means(lm, inp, am.to(device), {"text": tgt, "visual": vis}, layers, point=point)
                texts.append(means["text"])
                visuals.append(means["visual"])
            else:
                t_rows = [pre + ids[i][tgt[i]].tolist() for i in range(ids.shape[0])]
                t_ids, t_am = _pad_rows(t_rows, pad_id)
                t_mask = t_am.bool().clone()
                t_mask[:, : len(pre)] = False
                table = lm.get_input_embeddings()
                t_inp = table(t_ids.to(device))
                texts.append(
                    masked_layer_means(lm, t_inp, t_am.to(device), {"text": t_mask}, layers, point=point)["text"]
                )
                v_rows = [pre + [int(image_token_id)] * int(num_visual_tokens) for _ in range(ids.shape[0])]
                v_ids, v_am = _pad_rows(v_rows, pad_id)
                v_mask = v_ids == image_token_id
                v_inp = embed_fn(v_ids.to(device), emb.to(device))
                visuals.append(
                    masked_layer_means(lm, v_inp, v_am.to(device), {"visual": v_mask}, layers, point=point)["visual"]
                )
            seen += ids.shape[0]
    finally:
        lm.train(was_training)
    if not texts:
        raise ValueError("no calibration samples: the calibration source is empty or holds no sample with an image")
    blocks = decoder_layers(lm)
    layer_list = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    return GapStats(layer_list, torch.cat(texts), torch.cat(visuals), source=source, mode=mode, point=point)
