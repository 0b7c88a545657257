"""Analyses behind the three methods: LMAR (MoReS eq. 2), projector spectrum (APP appendix A) and
Gap-Init alignment (Gap-Init §4.3 / appendix A.3).

LMAR (Layer-wise Modality Attention Ratio)::

    LMAR_l = 1/N sum_i alpha_l^{image,i} / alpha_l^{text,i}                              (MoReS eq. 2)

``alpha_l^{m,i}``: attention paid by sample i's *generated* tokens (the query that produces each new
token: the last prompt position at the first step, then each decode step) to the prompt keys of
modality m in layer l, averaged over heads and over generation steps (up to and including the first
EOS). ``reduce="mean"`` (default, "mean attention scores") takes the mean weight per key of the
modality; ``reduce="sum"`` the total attention mass on it. Text keys = non-visual, non-padding prompt
tokens (system and template tokens included) unless a ``text_mask`` is given; ``text_keys=
"prompt+generated"`` adds the tokens generated so far (needed for ``plain``-template prompts, which hold no
text). Needs eager attention (switched on temporarily).

Projector spectrum: singular values of tau = W_ft - W_pre per projector matrix and their cumulative
energy sum_{i<=k} s_i^2 / sum s_i^2, with the k chosen by the APP rule marked.

Gap-Init alignment: cos(B[:,0], g_hat_l) per LoRA module at initialisation (1 for Gap-Init, ~d^-1/2 for a
random direction), and, during the first optimisation steps, the norm of the full-weight gradient along
the gap direction ``||g_hat^T dL/dW||`` (= ||sum_t (g_hat . dL/dh_t) x_t||), next to the gradient along
the adapter's own direction ``||b_hat^T dL/dW||`` (which is what a rank-1 A receives).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

# ------------------------------------------------------------------------------------------------ LMAR


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
        out = lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), max_new_tokens=max_new_tokens,
                          do_sample=False, output_attentions=True, return_dict_in_generate=True, **gen_kw)
    steps = len(out.attentions)
    if steps == 0:
        raise RuntimeError("generation produced no step")
    n_layers = len(out.attentions[0])
    seqs = out.sequences[:, -steps:].cpu()
    eos = eos_token_id if eos_token_id is not None else getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
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
        gen = torch.ones(B, s, dtype=torch.float64) if text_keys == "prompt+generated" else torch.zeros(B, s, dtype=torch.float64)
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


def plot_lines(series: Mapping[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str, ylabel: str,
               logy: bool = False) -> Path:
    """One line per entry of ``series`` (label -> values), saved as PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, ys in series.items():
        ax.plot(range(len(ys)), list(ys), marker="o", ms=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_lmar_report(results: Mapping[str, Mapping], out_dir: str | Path) -> dict:
    """Write ``lmar.json`` and ``lmar.png`` (one line per method) from ``{method: {"lmar": [...], ...}}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lmar.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    plot_lines({k: v["lmar"] for k, v in results.items()}, out_dir / "lmar.png", title="Layer-wise modality attention ratio",
               xlabel="layer", ylabel="LMAR (visual / text attention)")
    return {"json": str(out_dir / "lmar.json"), "png": str(out_dir / "lmar.png")}


# ------------------------------------------------------------------------------------------------ spectrum


def projector_spectrum(pre_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor], out_dir: str | Path,
                       config=None) -> dict:
    """Singular values of tau per projector matrix + cumulative energy; writes ``spectrum.json/png``.

    ``config``: an ``AppConfig`` whose k rule is marked on the plot (default energy 0.8).
    Returns ``{name: {"spectrum", "cumulative_energy", "k", "rank"}}``.
    """
    from .app import AppConfig, svd_truncate, task_vector

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = config or AppConfig()
    tau = task_vector(pre_sd, ft_sd)
    mats = {n: t for n, t in sorted(tau.items()) if t.dim() == 2}
    if not mats:
        raise ValueError("no 2-D weight matrix in the projector state dicts")
    res = {}
    for n, t in mats.items():
        mode = config.mode if config.mode in ("energy", "ratio") else "energy"
        _, info = svd_truncate(t, mode=mode, k_ratio=config.k_ratio, energy=config.energy, min_k=config.min_k)
        s = torch.tensor(info["spectrum"], dtype=torch.float64)
        cum = (torch.cumsum(s**2, 0) / (s**2).sum()).tolist() if float(s.sum()) > 0 else [1.0] * len(s)
        res[n] = {"spectrum": info["spectrum"], "cumulative_energy": cum, "k": info["k"], "rank": info["rank"],
                  "retained_energy": info["retained_energy"]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(res), figsize=(5.2 * len(res), 3.8), dpi=110, squeeze=False)
    for ax, (n, r) in zip(axes[0], res.items()):
        xs = range(1, len(r["spectrum"]) + 1)
        ax.semilogy(xs, [max(v, 1e-30) for v in r["spectrum"]], color="tab:blue", label="singular value")
        ax.set_xlabel("component i")
        ax.set_ylabel("sigma_i", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, r["cumulative_energy"], color="tab:red", label="cumulative energy")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("sum_{j<=i} sigma_j^2 / sum sigma^2", color="tab:red")
        ax.axvline(r["k"], color="gray", ls="--")
        ax.set_title(f"{n}: k={r['k']}/{r['rank']} ({r['retained_energy']:.1%} energy)")
    fig.tight_layout()
    fig.savefig(out_dir / "spectrum.png")
    plt.close(fig)
    (out_dir / "spectrum.json").write_text(json.dumps({"config": config.to_dict(), "matrices": res}, indent=2))
    return res


# ------------------------------------------------------------------------------------------------ Gap-Init


@torch.no_grad()
def init_alignment(peft_model: nn.Module, gaps: Mapping[int, torch.Tensor], adapter: str = "default") -> dict[str, float]:
    """cos(B[:, 0], g_l) for every LoRA module whose output dim matches the gap (others skipped).

    A zero B column (PEFT's default init) gives NaN (no direction yet)."""
    from .gap_init import lora_modules
    from .methods import layer_index

    out = {}
    for name, mod in lora_modules(peft_model, adapter).items():
        li = layer_index(name)
        if li not in gaps:
            continue
        g = gaps[li].double().cpu()
        b = mod.lora_B[adapter].weight[:, 0].detach().double().cpu()
        if b.numel() != g.numel():
            continue
        nb = float(b.norm())
        out[name] = float(b @ g / (nb * g.norm())) if nb > 0 else float("nan")
    return out


class _GradProbe:
    """Forward hooks on LoRA modules computing ||u^T dL/dW|| = ||sum_t (u . dL/dh_t) x_t|| for given u."""

    def __init__(self, modules: Mapping[str, nn.Module], dirs: Mapping[str, Callable[[], dict[str, torch.Tensor]]]):
        self.values: dict[str, dict[str, torch.Tensor]] = {}
        self.handles = []
        for name, mod in modules.items():
            self.handles.append(mod.register_forward_hook(self._hook(name, dirs[name])))

    def _hook(self, name, dir_fn):
        def hook(mod, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()

            def on_grad(g, x=x):
                gd = g.detach().double().reshape(-1, g.shape[-1])
                xd = x.double().reshape(-1, x.shape[-1])
                vals = self.values.setdefault(name, {})
                for key, u in dir_fn().items():
                    coef = gd @ u.to(gd.device)  # (N,) u . dL/dh_t
                    vec = (coef[:, None] * xd).sum(0).cpu()  # u^T dL/dW, (in,)
                    vals[key] = vals[key] + vec if key in vals else vec
            output.register_hook(on_grad)
        return hook

    def collect(self) -> dict[str, dict[str, float]]:
        """Norms of the accumulated ``u^T dL/dW`` vectors since the last call, then reset."""
        res = {name: {k: float(v.norm()) for k, v in vals.items()} for name, vals in self.values.items()}
        self.values = {}
        return res

    def remove(self):
        for h in self.handles:
            h.remove()


def gradient_trace(
    peft_model: nn.Module,
    loss_fn: Callable[[dict], torch.Tensor],
    batches: Iterable[dict],
    gaps: Mapping[int, torch.Tensor],
    *,
    steps: int = 5,
    lr: float = 2e-4,
    params: Sequence[nn.Parameter] | None = None,
    adapter: str = "default",
) -> list[dict]:
    """Train a few AdamW steps and record, per step, the mean over gap-sized LoRA modules of
    ``gap_grad`` = ||g_hat^T dL/dW||, ``dir_grad`` = ||b_hat^T dL/dW|| (b_hat = B[:,0]/||B[:,0]||; 0 while
    B is zero), ``grad_A`` = ||dL/dA||, and ``cos_b_gap`` = cos(B[:,0], g_hat) before the step.

    ``loss_fn(batch) -> scalar`` runs the model; ``params``: what the optimizer updates (default: the
    LoRA parameters). Returns one dict per step.
    """
    from .gap_init import lora_modules
    from .methods import layer_index

    mods = {n: m for n, m in lora_modules(peft_model, adapter).items()
            if layer_index(n) in gaps and m.out_features == gaps[layer_index(n)].numel()}
    if not mods:
        raise ValueError("no LoRA module matches the gap dimension")
    ghat = {n: (gaps[layer_index(n)].double() / gaps[layer_index(n)].double().norm()) for n in mods}

    def dirs_for(n):
        def f():
            b = mods[n].lora_B[adapter].weight[:, 0].detach().double().cpu()
            nb = float(b.norm())
            d = {"gap_grad": ghat[n]}
            d["dir_grad"] = b / nb if nb > 0 else torch.zeros_like(b)
            return d
        return f

    if params is None:
        params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    probe = _GradProbe(mods, {n: dirs_for(n) for n in mods})
    trace = []
    try:
        it = iter(batches)
        for step in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                break
            cos = init_alignment(peft_model, {layer_index(n): ghat[n] for n in mods}, adapter)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            loss.backward()
            vals = probe.collect()
            gA = [float(mods[n].lora_A[adapter].weight.grad.norm()) if mods[n].lora_A[adapter].weight.grad is not None else 0.0
                  for n in mods]
            cos_vals = [c for n, c in cos.items() if n in mods and not math.isnan(c)]
            trace.append({
                "step": step,
                "loss": float(loss.detach()),
                "gap_grad": _mean([vals.get(n, {}).get("gap_grad", 0.0) for n in mods]),
                "dir_grad": _mean([vals.get(n, {}).get("dir_grad", 0.0) for n in mods]),
                "grad_A": _mean(gA),
                "cos_b_gap": _mean(cos_vals) if cos_vals else float("nan"),
                "per_module": {n: {**vals.get(n, {}), "cos_b_gap": cos.get(n, float("nan"))} for n in mods},
            })
            opt.step()
    finally:
        probe.remove()
    return trace


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


# ------------------------------------------------------------------------------------------------ on exports


def load_pairs(*, shards: str | None = None, embeddings: str | None = None, texts: str | None = None,
               limit: int = 64) -> tuple[list, list[str]]:
    """(embeddings, texts) pairs from shards (folder / .tar / glob with ``emb.npy`` + ``txt``) or a ``.npy`` (N, d)
    plus a text file with one line per row. At most ``limit`` pairs."""
    import numpy as np

    if shards:
        from ..shards.reader import iter_samples
        from .data import list_shards

        embs, txts = [], []
        for s in iter_samples(list_shards(shards)):
            embs.append(np.asarray(s["emb"], dtype=np.float32))
            txts.append(s["text"])
            if len(embs) >= limit:
                break
        if not embs:
            raise ValueError(f"{shards}: no sample")
        return embs, txts
    if embeddings is None:
        raise ValueError("give shards or embeddings (+ texts)")
    arr = np.load(embeddings, allow_pickle=False)
    if arr.ndim != 2:
        raise ValueError(f"{embeddings}: expected an (N, d) array, got shape {arr.shape}")
    lines = Path(texts).read_text(encoding="utf-8").splitlines() if texts else [""] * arr.shape[0]
    if len(lines) != arr.shape[0]:
        raise ValueError(f"{texts}: {len(lines)} lines for {arr.shape[0]} embeddings in {embeddings}")
    n = min(limit, arr.shape[0])
    return [arr[i].astype(np.float32) for i in range(n)], lines[:n]


def _emb_tensor(exported, embs) -> torch.Tensor:
    """(N, n, d) float32 tensor on the export's device, normalised with the export's stored transform."""
    import numpy as np

    arr = np.stack([np.asarray(e, dtype=np.float32) for e in embs])
    if arr.ndim == 2:
        arr = arr[:, None, :]
    m = exported.model
    want = (m.vectors_per_sample, m.projector.d_in)
    if tuple(arr.shape[1:]) != want:
        raise ValueError(f"embeddings have per-sample shape {tuple(arr.shape[1:])}; the export expects {want}")
    rows = [exported.transform(a, train=False) for a in arr]
    return torch.from_numpy(np.stack(rows)).to(exported.device)


def _export_batches(exported, embs, texts, *, prompt: str | None, for_generation: bool, batch_size: int):
    """Collated batches (``input_ids``, ``attention_mask``, ``labels``, ``emb``) for an ExportedModel."""
    import numpy as np

    from .data import Collator
    from .templates import caption_conversation

    m = exported.model
    p = exported.config.get("default_prompt", "") if prompt is None else prompt
    collate = Collator(exported.tokenizer.pad_token_id, padding_side="left" if for_generation else "right")
    emb = _emb_tensor(exported, embs)
    out = []
    for s in range(0, len(embs), batch_size):
        exs = []
        for t in texts[s:s + batch_size]:
            conv = caption_conversation(t, p)
            enc = exported.template.encode(conv[:1] if for_generation else conv, exported.tokenizer,
                                           image_token_id=m.image_token_id, num_image_tokens=m.num_visual_tokens,
                                           for_generation=for_generation,
                                           **({} if for_generation else {"max_length": exported.config.get("max_length")}))
            exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels, "truncated": False,
                        "reference": t})
        b = collate(exs)
        b["emb"] = emb[s:s + batch_size]
        out.append(b)
    return out


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
    for b in _export_batches(exported, embs, texts, prompt=prompt, for_generation=True, batch_size=batch_size):
        ids, am = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        inputs = m.embed(ids, b["emb"].to(dev))
        r = modality_attention(m.lm, inputs, am, m.visual_mask(ids), max_new_tokens=max_new_tokens, reduce=reduce,
                               text_keys=text_keys,
                               eos_token_id=exported.tokenizer.eos_token_id, pad_token_id=exported.tokenizer.pad_token_id)
        ratios.append(r["ratio"])
        imgs.append(r["image"])
        txts.append(r["text"])
        steps.append(r["steps"])
    ratio = torch.cat(ratios)
    return {"lmar": lmar(ratio), "per_layer_image": lmar(torch.cat(imgs)), "per_layer_text": lmar(torch.cat(txts)),
            "samples": int(ratio.shape[0]), "mean_steps": float(torch.cat(steps).mean()), "reduce": reduce,
            "text_keys": text_keys,
            "method": exported.config.get("method")}


def gap_alignment_for_export(load: Callable[[], object], embs, texts, *, calib_samples: int = 256,
                             num_layers: int = 6, targets: Sequence[str] | None = None, r: int = 1,
                             alpha: float = 2.0, steps: int = 5, lr: float = 2e-4, batch_size: int = 8,
                             seed: int = 0) -> dict:
    """Gap-Init alignment on an export's LM: cos(B[:,0], g) at init and the gradient trace of the first
    ``steps`` AdamW steps for three inits of the same rank-r LoRA: ``gap`` (Gap-Init), ``random``
    (random unit direction, A = 0) and ``peft_default`` (Kaiming A, B = 0).

    ``load()`` must return a fresh ``ExportedModel`` of a projector-only export (called once per variant).
    ``embs``/``texts``: paired embeddings and captions (calibration and training batches).
    """
    from peft import PeftModel, get_peft_model

    from .gap_init import (
        PAPER_TARGETS, apply_gap_init, collect_gap_stats, make_lora_config, normalized_gaps, random_directions,
        select_layers,
    )

    targets = list(targets or PAPER_TARGETS)
    base = load()
    if isinstance(base.model.lm, PeftModel):
        raise ValueError("gap alignment needs an export whose LM has no adapter (e.g. a stage-1 projector export)")
    m = base.model
    batches = _export_batches(base, embs, texts, prompt=None, for_generation=False, batch_size=batch_size)
    tok = base.tokenizer
    stats = collect_gap_stats(m.lm, m.embed, batches, image_token_id=m.image_token_id,
                              num_visual_tokens=m.num_visual_tokens, pad_id=tok.pad_token_id or 0,
                              prefix_ids=[tok.bos_token_id] if tok.bos_token_id is not None else [],
                              max_samples=calib_samples, source="analysis")
    L = len(stats.layers)
    layers = select_layers(L, strategy="last", n=num_layers)
    gaps = {li: g for li, g in stats.gaps().items() if li in layers}
    H = m.hidden_size
    results: dict = {"layers": layers, "calibration": stats.describe(), "variants": {}}
    for variant in ("gap", "random", "peft_default"):
        exp = load()
        em = exp.model
        for p in em.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)
        pm = get_peft_model(em.lm, make_lora_config(r=r, alpha=alpha, target_modules=targets, layers=layers))
        if variant == "gap":
            apply_gap_init(pm, normalized_gaps(gaps), hidden_size=H, seed=seed)
        elif variant == "random":
            apply_gap_init(pm, random_directions(layers, H, seed=seed), hidden_size=H, seed=seed)
        em.lm = pm
        em.train()
        cos0 = init_alignment(pm, gaps)

        def loss_fn(b, em=em):
            loss_sum, n = em(b["input_ids"], b["attention_mask"], b["emb"], labels=b["labels"])
            return loss_sum / n.clamp(min=1)

        trace = gradient_trace(pm, loss_fn, batches, gaps, steps=steps, lr=lr)
        vals = [c for c in cos0.values() if not math.isnan(c)]
        results["variants"][variant] = {
            "init_cos_mean": _mean(vals) if vals else float("nan"),
            "init_abs_cos_mean": _mean([abs(c) for c in vals]) if vals else float("nan"),
            "init_cos": cos0,
            "trace": [{k: v for k, v in t.items() if k != "per_module"} for t in trace],
        }
    results["expected_random_abs_cos"] = math.sqrt(2.0 / (math.pi * H))
    return results
