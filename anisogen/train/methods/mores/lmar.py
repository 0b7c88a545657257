"""LMAR, the layer-wise modality attention ratio of MoReS (eq. 2), measured during greedy generation.

::

    LMAR_l = 1/N sum_i alpha_l^{image,i} / alpha_l^{text,i}

``alpha_l^{m,i}``: attention paid by sample i's *generated* tokens (the query that produces each new
token: the last prompt position at the first step, then each decode step) to the prompt keys of
modality m in layer l, averaged over heads and over generation steps (up to and including the first
EOS). ``reduce="mean"`` (default, "mean attention scores") takes the mean weight per key of the
modality; ``reduce="sum"`` the total attention mass on it. Text keys = non-visual, non-padding prompt
tokens (system and template tokens included) unless a ``text_mask`` is given; ``text_keys=
"prompt+generated"`` adds the tokens generated so far (needed for ``plain``-template prompts, which hold no
text). Needs eager attention (switched on temporarily).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..analysis_common import export_batches, plot_lines


@contextlib.contextmanager
def eager_attention(lm: nn.Module):
    """Temporarily switch an HF model to eager attention (attention weights are only returned there)."""
    cfg = getattr(lm, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    if prev in (None, "eager"):
        yield lm
        return
    lm.set_attn_implementation("eager")
    try:
        yield lm
    finally:
        lm.set_attn_implementation(prev)


@torch.no_grad()
def modality_attention(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_mask: torch.Tensor,
    *,
    text_mask: torch.Tensor | None = None,
    text_keys: str = "prompt",
    max_new_tokens: int = 8,
    reduce: str = "mean",
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample, per-layer attention to visual and text tokens during greedy generation.

    Args:
        lm: HF causal LM (PEFT and steering hooks allowed; steering masks must already be set).
        inputs_embeds: (B, T, H) LEFT-padded prompts. attention_mask: (B, T).
        visual_mask: (B, T) bool visual positions. text_mask: (B, T) bool prompt text positions
            (default: the other unpadded prompt positions).
        text_keys: ``prompt`` (default; R_text of eq. 1) or ``prompt+generated`` (also the tokens
            generated so far, e.g. for ``plain``-template prompts that hold no text).
        max_new_tokens: generation length; steps after a sample's first EOS are ignored.
        reduce: ``mean`` (mean weight per key) | ``sum`` (attention mass).
    Returns:
        ``{"image": (B, L), "text": (B, L), "ratio": (B, L), "steps": (B,)}`` float64 CPU
        (``ratio = image / text``).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if text_keys not in ("prompt", "prompt+generated"):
        raise ValueError(f"text_keys must be 'prompt' or 'prompt+generated', got {text_keys!r}")
    am = attention_mask.bool()
    if bool(am[:, -1].logical_not().any()):
        raise ValueError("prompts must be LEFT-padded for generation (a row ends with padding)")
    vis = visual_mask.bool() & am
    txt = (am & ~vis) if text_mask is None else (text_mask.bool() & am & ~vis)
    empty = torch.nonzero(vis.sum(1) == 0).flatten()
    if empty.numel():
        raise ValueError(f"row {int(empty[0])} has no visual prompt token")
    if text_keys == "prompt":
        empty = torch.nonzero(txt.sum(1) == 0).flatten()
        if empty.numel():
            raise ValueError(f"row {int(empty[0])} has no text prompt token (a plain-template prompt?); "
                             "use text_keys='prompt+generated'")
    B, T = am.shape
    gen_kw = {}
    if eos_token_id is not None:
        gen_kw["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        gen_kw["pad_token_id"] = pad_token_id
    with eager_attention(lm):
        out = lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                          max_new_tokens=max_new_tokens,
                          do_sample=False, output_attentions=True, return_dict_in_generate=True, **gen_kw)
    steps = len(out.attentions)
    if steps == 0:
        raise RuntimeError("generation produced no step")
    n_layers = len(out.attentions[0])
    seqs = out.sequences[:, -steps:].cpu()
    eos = (
        eos_token_id
        if eos_token_id is not None
        else getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    )
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    valid = torch.ones(B, steps, dtype=torch.bool)
    for b in range(B):
        for s in range(steps):
            if int(seqs[b, s]) in eos_ids:
                valid[b, s + 1:] = False
                break
    vis_c, txt_c = vis.double().cpu(), txt.double().cpu()
    img = torch.zeros(B, n_layers, dtype=torch.float64)
    tex = torch.zeros(B, n_layers, dtype=torch.float64)
    n_img = torch.zeros(B, dtype=torch.float64)
    n_txt = torch.zeros(B, dtype=torch.float64)
    for s in range(steps):
        # keys at step s: T prompt positions, then the s tokens generated before this query
        gen = (
            torch.ones(B, s, dtype=torch.float64)
            if text_keys == "prompt+generated"
            else torch.zeros(B, s, dtype=torch.float64)
        )
        tw = torch.cat([txt_c, gen], dim=1)
        vw = torch.cat([vis_c, torch.zeros(B, s, dtype=torch.float64)], dim=1)
        has_txt = tw.sum(1) > 0
        if reduce == "mean":
            vw = vw / vw.sum(1, keepdim=True)
            tw = tw / tw.sum(1, keepdim=True).clamp(min=1)
        w = valid[:, s].double()
        wt = w * has_txt.double()
        for li in range(n_layers):
            a = out.attentions[s][li][:, :, -1, :].double().mean(1).cpu()  # (B, T + s) head-averaged
            img[:, li] += w * (a * vw).sum(1)
            tex[:, li] += wt * (a * tw).sum(1)
        n_img += w
        n_txt += wt
    img /= n_img[:, None]
    tex /= n_txt.clamp(min=1)[:, None]
    return {"image": img, "text": tex, "ratio": img / tex, "steps": n_img}


def lmar(ratios: torch.Tensor) -> list[float]:
    """Eq. 2: mean over samples of the per-sample ratios (B, L) -> L values."""
    return [float(x) for x in ratios.double().mean(0)]


def write_lmar_report(results: Mapping[str, Mapping], out_dir: str | Path) -> dict:
    """Write ``lmar.json`` and ``lmar.png`` (one line per method) from ``{method: {"lmar": [...], ...}}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lmar.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    plot_lines({k: v["lmar"] for k, v in results.items()}, out_dir / "lmar.png",
               title="Layer-wise modality attention ratio",
               xlabel="layer", ylabel="LMAR (visual / text attention)")
    return {"json": str(out_dir / "lmar.json"), "png": str(out_dir / "lmar.png")}



@torch.no_grad()
def lmar_for_export(exported, embs, texts=None, *, prompt: str | None = None, max_new_tokens: int = 16,
                    batch_size: int = 8, reduce: str = "mean", text_keys: str = "prompt") -> dict:
    """LMAR of an export (``anisogen.train.load_export``) on ``embs``; returns ``{"lmar", "per_layer_image",
    "per_layer_text", "samples", "mean_steps"}``. Steering (MoReS) and adapters of the export are active."""
    texts = texts or [""] * len(embs)
    m = exported.model
    m.eval()
    dev = exported.device
    ratios, imgs, txts, steps = [], [], [], []
    for b in export_batches(exported, embs, texts, prompt=prompt, for_generation=True, batch_size=batch_size):
        ids, am = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        inputs = m.embed(ids, b["emb"].to(dev))
        r = modality_attention(m.lm, inputs, am, m.visual_mask(ids), max_new_tokens=max_new_tokens, reduce=reduce,
                               text_keys=text_keys,
                               eos_token_id=exported.tokenizer.eos_token_id,
                               pad_token_id=exported.tokenizer.pad_token_id)
        ratios.append(r["ratio"])
        imgs.append(r["image"])
        txts.append(r["text"])
        steps.append(r["steps"])
    ratio = torch.cat(ratios)
    return {"lmar": lmar(ratio), "per_layer_image": lmar(torch.cat(imgs)), "per_layer_text": lmar(torch.cat(txts)),
            "samples": int(ratio.shape[0]), "mean_steps": float(torch.cat(steps).mean()), "reduce": reduce,
            "text_keys": text_keys,
            "method": exported.config.get("method")}
