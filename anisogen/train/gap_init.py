"""Gap-Init: rank-1 LoRA whose B column starts along the layer's modality gap.

Paper: "When Is Rank-1 Enough? Geometry-Guided Initialization for Parameter-Efficient Fine-Tuning"
(Zhao, Han, Hovy, ICML 2026, arXiv 2602.01522), §4.2-4.4, Alg. 1, appendices C (SPOT-Gap), E (noise) and
G (hyper-parameters); how we resolved its ambiguities is listed in ``docs/METHODS.md``.

Pipeline::

    calibration batches --(forward hooks on decoder blocks)--> per-sample means over text / visual
    positions  -->  g_l = mean_i(text_i) - mean_i(visual_i)          (§4.2, G.4 steps 3-5)
               -->  optional noise: g' = normalize(g_hat + eps * eta / sqrt(d))   (App. E)
    PEFT LoraConfig(r=1, alpha=2, dropout=0.05) + get_peft_model
               -->  for every LoRA module of layer l with out_features == hidden size:
                    A <- 0, B[:, 0] <- g_l / ||g_l||, other columns of B random unit vectors (Alg. 1)
                    other modules (e.g. GQA k_proj / v_proj) keep PEFT's init (logged in the report)

Layer choice: ``last`` (naive: the last N decoder layers) or ``ggsafe`` (top-N by the SPOT-Gap score
of appendix C).

The public functions take an HF causal LM (or a PEFT model) plus tensors; :func:`collect_gap_stats`
additionally takes an ``embed_fn(input_ids, emb) -> inputs_embeds`` (``EmbeddingLM.embed``) so that
the visual hidden states are those of the projected embeddings, exactly as in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

IGNORE_INDEX = -100

#: Llama names of the paper's targets (OPT q,k,v,o_proj + fc1/fc2 -> gate/up/down_proj).
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---------------------------------------------------------------------------------------------------
# Decoder-layer helpers (shared with mores.py and analysis.py)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-block ``ModuleList`` of an HF causal LM (also through PEFT / EmbeddingLM wrappers).

    Looks for the ``ModuleList`` named ``*.layers`` / ``*.h`` / ``*.blocks`` whose length equals
    ``config.num_hidden_layers`` (or the longest such list when the config is unknown).
    """
    n_expected = None
    for m in (model, getattr(model, "lm", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "num_hidden_layers", None):
            n_expected = int(cfg.num_hidden_layers)
            break
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if n_expected is not None and len(mod) == n_expected:
                return mod
            if best is None or len(mod) > len(best):
                best = mod
    if best is None or n_expected is not None:
        raise ValueError("could not find the decoder layers (a ModuleList named 'layers'/'h'/'blocks') in the model")
    return best


def block_hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's output (bare tensor, or element 0 of a tuple)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"unsupported decoder-layer output type {type(output).__name__}")


def replace_block_hidden(output, hidden: torch.Tensor):
    """``output`` with its hidden-state tensor replaced by ``hidden`` (same container form)."""
    if torch.is_tensor(output):
        return hidden
    return type(output)((hidden, *output[1:])) if isinstance(output, tuple) else [hidden, *output[1:]]


# ---------------------------------------------------------------------------------------------------
# Calibration: masked per-layer means through forward hooks


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
            its target tokens (the caption / answer paired with the embedding).
        image_token_id, num_visual_tokens: placeholder id and count per sample.
        pad_id: id used to pad the rebuilt sequences (masked out; any id works).
        prefix_ids: tokens put before each isolated sequence in ``separate`` mode (e.g. BOS); they
            are never averaged.
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
            if max_samples is not None:
                take = min(ids.shape[0], max_samples - seen)
                if take <= 0:
                    break
                ids, labels, emb = ids[:take], labels[:take], emb[:take]
                am = b["attention_mask"][:take]
            else:
                am = b["attention_mask"]
            tgt = labels != IGNORE_INDEX
            no_text = torch.nonzero(tgt.sum(1) == 0).flatten()
            if no_text.numel():
                keys = b.get("keys")
                row = int(no_text[0])
                who = f"key {keys[row]!r}" if keys else f"row {row}"
                raise ValueError(f"calibration batch {bi}, {who}: no target (text) tokens to average")
            if mode == "joint":
                vis = ids == image_token_id
                inp = embed_fn(ids.to(device), emb.to(device))
                means = masked_layer_means(lm, inp, am.to(device), {"text": tgt, "visual": vis}, layers, point=point)
                texts.append(means["text"])
                visuals.append(means["visual"])
            else:
                pre = [int(x) for x in prefix_ids]
                t_rows = [pre + ids[i][tgt[i]].tolist() for i in range(ids.shape[0])]
                t_ids, t_am = _pad_rows(t_rows, pad_id)
                t_mask = t_am.bool().clone()
                t_mask[:, : len(pre)] = False
                table = lm.get_input_embeddings()
                t_inp = table(t_ids.to(device))
                texts.append(masked_layer_means(lm, t_inp, t_am.to(device), {"text": t_mask}, layers, point=point)["text"])
                v_rows = [pre + [int(image_token_id)] * int(num_visual_tokens) for _ in range(ids.shape[0])]
                v_ids, v_am = _pad_rows(v_rows, pad_id)
                v_mask = v_ids == image_token_id
                v_inp = embed_fn(v_ids.to(device), emb.to(device))
                visuals.append(masked_layer_means(lm, v_inp, v_am.to(device), {"visual": v_mask}, layers, point=point)["visual"])
            seen += ids.shape[0]
    finally:
        lm.train(was_training)
    if not texts:
        raise ValueError("no calibration samples: the calibration source is empty")
    blocks = decoder_layers(lm)
    layer_list = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    return GapStats(layer_list, torch.cat(texts), torch.cat(visuals), source=source, mode=mode, point=point)


def normalized_gaps(
    gaps: Mapping[int, torch.Tensor], *, noise_eps: float = 0.0, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Unit gap directions, optionally perturbed (paper App. E).

    ``g' = normalize(g_hat + noise_eps * eta / sqrt(d))`` with ``eta ~ N(0, I_d)`` drawn from a
    generator seeded by ``seed`` + layer index, so the expected noise norm is ``noise_eps`` relative to
    the unit gap (cos(g', g_hat) ~ 1/sqrt(1 + eps^2)). Raises on a zero gap.
    """
    out = {}
    for li, g in gaps.items():
        g = g.double().cpu()
        n = float(g.norm())
        if not math.isfinite(n) or n == 0.0:
            raise ValueError(f"layer {li}: modality gap has norm {n}; cannot initialise along it")
        u = g / n
        if noise_eps:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(li))
            eta = torch.randn(u.shape, generator=gen, dtype=torch.float64)
            u = u + noise_eps * eta / math.sqrt(u.numel())
            u = u / u.norm()
        out[int(li)] = u
    return out


# ---------------------------------------------------------------------------------------------------
# SPOT-Gap score and layer selection (appendix C, §4.4 GG-Safe)


def _knn_mean_dist(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) mean L2 distance to the k nearest other rows, and (N, k) their indices."""
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    vals, idx = torch.topk(d, k, dim=1, largest=False)
    return vals.mean(1), idx


def spot_gap_scores(
    text: torch.Tensor,
    visual: torch.Tensor,
    *,
    k: int = 5,
    alpha_sem: float = 1.0,
    alpha_geom: float = 1.0,
) -> torch.Tensor:
    """Layer-wise SPOT-Gap score S_gap^(l) (appendix C, Alg. 2).

    Args:
        text, visual: (N, L, H) paired per-sample hidden states (:class:`GapStats` fields).
        k: neighbourhood size (clamped to N-1).
        alpha_sem, alpha_geom: weights of the semantic and geometric terms (unspecified in the paper).
    Per layer: s_sem,i = ||t_i - v_i|| (C.1); d_v,i / d_t,i = mean distance to the k nearest
    neighbours within each modality (self excluded); s_geom,i = |d_t,i - d_v,i| (C.2); the combined
    score is averaged over the k nearest paired samples N_k(i), found in the concatenated [t_i, v_i]
    space, self excluded (C.3); S = mean_i (C.4).
    Returns:
        (L,) float64.
    """
    if text.shape != visual.shape or text.dim() != 3:
        raise ValueError(f"text/visual must both be (N, L, H); got {tuple(text.shape)} and {tuple(visual.shape)}")
    n = text.shape[0]
    if n < 2:
        raise ValueError("SPOT-Gap needs at least 2 calibration samples")
    k = min(int(k), n - 1)
    scores = []
    for li in range(text.shape[1]):
        t, v = text[:, li].double(), visual[:, li].double()
        s_sem = (t - v).norm(dim=1)
        d_t, _ = _knn_mean_dist(t, k)
        d_v, _ = _knn_mean_dist(v, k)
        s_geom = (d_t - d_v).abs()
        comb = alpha_sem * s_sem + alpha_geom * s_geom
        _, nbr = _knn_mean_dist(torch.cat([t, v], dim=1), k)
        smoothed = comb[nbr].mean(1)
        scores.append(smoothed.mean())
    return torch.stack(scores)


def select_layers(
    num_layers: int,
    *,
    strategy: str = "last",
    n: int = 6,
    scores: Sequence[float] | torch.Tensor | None = None,
    score_layers: Sequence[int] | None = None,
    skip_first: int = 0,
) -> list[int]:
    """Decoder layers that get adapters.

    ``last``: the last ``n`` layers (paper's naive default, top-6). ``ggsafe``: the ``n`` layers with
    the highest SPOT-Gap ``scores`` (given for ``score_layers``, default all), excluding the first
    ``skip_first`` layers ("safety"; the paper excludes early vision-encoder layers, which we do not
    adapt, so the default is 0). Returned sorted ascending.
    """
    n = max(1, min(int(n), num_layers))
    if strategy == "last":
        return list(range(num_layers - n, num_layers))
    if strategy != "ggsafe":
        raise ValueError(f"layer strategy must be 'last' or 'ggsafe', got {strategy!r}")
    if scores is None:
        raise ValueError("ggsafe layer selection needs SPOT-Gap scores")
    score_layers = list(range(num_layers)) if score_layers is None else list(score_layers)
    sc = [float(s) for s in scores]
    cand = [(s, li) for s, li in zip(sc, score_layers) if li >= skip_first]
    if not cand:
        raise ValueError(f"ggsafe: no layer left after skipping the first {skip_first}")
    cand.sort(key=lambda x: (-x[0], x[1]))
    return sorted(li for _, li in cand[:n])


# ---------------------------------------------------------------------------------------------------
# LoRA configuration and the Gap-Init overwrite


def linear_out_features(lm: nn.Module, targets: Sequence[str], layers: Sequence[int]) -> dict[str, int]:
    """Full module name -> out_features for every ``nn.Linear`` named like ``targets`` in ``layers``."""
    from .methods import layer_index

    out = {}
    want = set(int(x) for x in layers)
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets and layer_index(name) in want:
            out[name] = int(mod.out_features)
    return out


def make_lora_config(
    *,
    r: int = 1,
    alpha: float = 2.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] = PAPER_TARGETS,
    layers: Sequence[int] | None = None,
    exclude: Sequence[str] | None = None,
    use_rslora: bool = False,
):
    """``peft.LoraConfig`` for Gap-Init (defaults: Table 13 -- r 1, alpha 2, dropout 0.05).

    ``layers``: decoder-layer indices (``layers_to_transform``). ``exclude``: full module names left
    without an adapter (``mismatch="exclude"``). PEFT's default init (Kaiming-uniform A, zero B) is
    requested; :func:`apply_gap_init` overwrites it.
    """
    from peft import LoraConfig

    kw = {}
    if exclude:
        kw["exclude_modules"] = list(exclude)
    return LoraConfig(
        r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(target_modules),
        layers_to_transform=None if layers is None else [int(x) for x in layers], bias="none",
        task_type="CAUSAL_LM", init_lora_weights=True, use_rslora=use_rslora, **kw,
    )


@torch.no_grad()
def apply_gap_init(
    peft_model: nn.Module,
    directions: Mapping[int, torch.Tensor],
    *,
    adapter: str = "default",
    hidden_size: int | None = None,
    mismatch: str = "peft_init",
    seed: int = 0,
) -> dict:
    """Overwrite PEFT LoRA tensors: ``A = 0``, ``B[:, 0] = u_l`` (unit direction of layer l).

    Args:
        peft_model: model after ``get_peft_model``.
        directions: layer -> (H,) unit vector (:func:`normalized_gaps`); a random unit vector gives the
            paper's random-direction control.
        adapter: PEFT adapter name.
        hidden_size: H (default: length of the direction vectors).
        mismatch: what to do with a LoRA module whose ``out_features != H`` (GQA ``k_proj``/``v_proj``,
            ``gate``/``up_proj``): ``peft_init`` (keep PEFT's init, default) or ``raise``.
        seed: for the extra B columns when r > 1 (random unit vectors, Alg. 1 line 18).
    Returns:
        report ``{"modules": [{"name", "layer", "out_features", "action", "reason"?}], "counts": {...}}``;
        ``action`` is ``gap_init`` or ``peft_init``.
    Raises:
        ValueError when a LoRA module's layer has no direction, or on a mismatch with ``mismatch="raise"``.
    """
    from peft.tuners.lora import LoraLayer

    from .methods import layer_index

    if mismatch not in ("peft_init", "raise"):
        raise ValueError(f"mismatch must be 'peft_init' or 'raise' (use make_lora_config(exclude=...) to exclude), got {mismatch!r}")
    if not directions:
        raise ValueError("apply_gap_init: no gap directions given")
    if hidden_size is None:
        hidden_size = int(next(iter(directions.values())).numel())
    gen = torch.Generator().manual_seed(int(seed))
    modules = []
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer) or adapter not in getattr(mod, "lora_A", {}):
            continue
        li = layer_index(name)
        entry = {"name": name, "layer": li, "out_features": int(mod.out_features), "in_features": int(mod.in_features)}
        A = mod.lora_A[adapter].weight
        B = mod.lora_B[adapter].weight
        if mod.out_features != hidden_size:
            reason = f"out_features {mod.out_features} != hidden size {hidden_size}"
            if mismatch == "raise":
                raise ValueError(f"Gap-Init cannot initialise {name}: {reason}")
            entry.update(action="peft_init", reason=reason)
            modules.append(entry)
            continue
        if li not in directions:
            raise ValueError(f"{name}: no gap direction for decoder layer {li} (have {sorted(directions)})")
        u = directions[li].to(dtype=torch.float64, device="cpu")
        if abs(float(u.norm()) - 1.0) > 1e-6:
            raise ValueError(f"direction for layer {li} is not unit norm ({float(u.norm())})")
        r = B.shape[1]
        newB = torch.empty(B.shape, dtype=torch.float64)
        newB[:, 0] = u
        if r > 1:
            extra = torch.randn((B.shape[0], r - 1), generator=gen, dtype=torch.float64)
            newB[:, 1:] = extra / extra.norm(dim=0, keepdim=True)
        B.copy_(newB.to(B.dtype))
        A.zero_()
        entry.update(action="gap_init", rank=int(r))
        modules.append(entry)
    if not modules:
        raise ValueError(f"the model has no LoRA module for adapter {adapter!r}")
    counts: dict[str, int] = {}
    for m in modules:
        counts[m["action"]] = counts.get(m["action"], 0) + 1
    if not counts.get("gap_init"):
        raise ValueError("no LoRA module has out_features == hidden size; Gap-Init would be a plain LoRA")
    return {"modules": modules, "counts": counts, "hidden_size": int(hidden_size)}


def random_directions(layers: Sequence[int], dim: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """layer -> random unit vector (the paper's random-direction control, App. A.3)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for li in layers:
        v = torch.randn(int(dim), generator=gen, dtype=torch.float64)
        out[int(li)] = v / v.norm()
    return out


def lora_modules(peft_model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """name -> PEFT LoraLayer holding ``adapter``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})}


# ---------------------------------------------------------------------------------------------------
# Trainer integration (anisogen.train.methods registry)


GAP_INIT_OPTIONS = {
    "r": (1, "LoRA rank (paper: 1)"),
    "alpha": (2.0, "LoRA alpha (paper: 2 for r=1)"),
    "dropout": (0.05, "LoRA dropout"),
    "targets": (list(PAPER_TARGETS), "comma-separated target module names (Gap-Init where out_features == hidden size)"),
    "layers": ("last", "layer choice: last (naive, last N) | ggsafe (top-N SPOT-Gap score)"),
    "num_layers": (6, "N, number of adapted decoder layers"),
    "skip_first": (0, "ggsafe: never pick the first K layers"),
    "calib_samples": (256, "calibration pairs (paper: 256)"),
    "calib_mode": ("separate", "separate (text and visual in two passes, paper) | joint (training sequence)"),
    "point": ("output", "hidden state of layer l: output (block output) | input (block input)"),
    "noise_eps": (0.0, "gap noise g' = normalize(g_hat + eps*eta/sqrt(d)) (paper App. E)"),
    "direction": ("gap", "gap | random (control: random unit direction, same A=0 init)"),
    "mismatch": ("peft_init", "modules with out_features != hidden: peft_init | exclude | raise"),
    "spot_k": (5, "SPOT-Gap neighbourhood size"),
    "seed": (0, "seed of the noise / random directions / extra B columns"),
}


def _prepare_gap_init(ctx):
    from peft import get_peft_model

    from .methods import MethodSetup, ParamGroup, projector_groups

    o = ctx.options
    elm = ctx.model
    elm.freeze_lm()
    lm = elm.lm
    blocks = decoder_layers(lm)
    L = len(blocks)
    H = elm.hidden_size
    need_stats = (not ctx.resuming) or o["layers"] == "ggsafe"
    info: dict = {"lm": "lora", "init": "gap_init" if o["direction"] == "gap" else "random_direction"}
    stats = None
    if need_stats:
        if ctx.calibration is None:
            raise ValueError("gap_init needs calibration data but the trainer provided none")
        batches = ctx.calibration(int(o["calib_samples"]))
        tok = ctx.tokenizer
        prefix = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        stats = collect_gap_stats(
            lm, elm.embed, batches, image_token_id=elm.image_token_id, num_visual_tokens=elm.num_visual_tokens,
            pad_id=tok.pad_token_id or 0, prefix_ids=prefix, mode=o["calib_mode"], point=o["point"],
            max_samples=int(o["calib_samples"]), source="train", device=ctx.device,
        )
        info["calibration"] = stats.describe()
        info["calibration"]["source_note"] = (
            "embeddings of the training stream (substitute embeddings unless the shards hold real image embeddings)")
        if stats.num_samples < int(o["calib_samples"]):
            ctx.log(f"gap_init: only {stats.num_samples} calibration samples available (asked {o['calib_samples']})")
    scores = None
    if o["layers"] == "ggsafe":
        scores = spot_gap_scores(stats.text, stats.visual, k=int(o["spot_k"]))
        info["spot_gap_scores"] = [float(s) for s in scores]
    layers = select_layers(L, strategy=o["layers"], n=int(o["num_layers"]), scores=scores,
                           score_layers=stats.layers if stats else None, skip_first=int(o["skip_first"]))
    info["layers"] = layers
    exclude = None
    if o["mismatch"] == "exclude":
        outs = linear_out_features(lm, o["targets"], layers)
        exclude = [n for n, d in outs.items() if d != H]
        info["excluded_modules"] = exclude
    cfg = make_lora_config(r=int(o["r"]), alpha=float(o["alpha"]), dropout=float(o["dropout"]),
                           target_modules=o["targets"], layers=layers, exclude=exclude)
    peft_model = get_peft_model(lm, cfg)
    if stats is not None:
        if o["direction"] == "gap":
            dirs = normalized_gaps({li: g for li, g in stats.gaps().items() if li in layers},
                                   noise_eps=float(o["noise_eps"]), seed=int(o["seed"]))
        elif o["direction"] == "random":
            dirs = random_directions(layers, H, seed=int(o["seed"]))
        else:
            raise ValueError(f"gap_init direction must be 'gap' or 'random', got {o['direction']!r}")
        report = apply_gap_init(peft_model, dirs, hidden_size=H,
                                mismatch="raise" if o["mismatch"] == "raise" else "peft_init", seed=int(o["seed"]))
        info["init_report"] = report
        ctx.log(f"gap_init: layers {layers}; {report['counts']} (calibration: {stats.num_samples} samples, "
                f"{stats.mode} passes, block {stats.point})")
    elm.lm = peft_model
    adapters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in adapters:
        p.requires_grad_(True)
    n_adapter = sum(p.numel() for p in adapters)
    info["adapter_parameters"] = n_adapter
    return MethodSetup(groups=projector_groups(ctx) + [ParamGroup("adapter", adapters, role="adapter")], info=info)


def _register() -> None:
    from .methods import export_peft_adapter, load_peft_adapter, register_method

    register_method(
        "gap_init", _prepare_gap_init, export=export_peft_adapter, load=load_peft_adapter, options=GAP_INIT_OPTIONS,
        description="rank-1 PEFT LoRA with B[:,0] along the calibrated modality gap and A=0 (Gap-Init)",
    )


_register()
