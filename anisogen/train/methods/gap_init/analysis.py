"""Gap-Init alignment analyses (§4.3, appendix A.3): cos(B[:,0], g) at init and the gradient along the gap.

``init_alignment``: cos(B[:,0], g_hat_l) per LoRA module (1 for Gap-Init, ~d^-1/2 for a random
direction). ``gradient_trace``: over the first optimisation steps, the norm of the full-weight gradient
along the gap direction ``||g_hat^T dL/dW||`` (= ||sum_t (g_hat . dL/dh_t) x_t||), next to the gradient
along the adapter's own direction ``||b_hat^T dL/dW||`` (which is what a rank-1 A receives).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..analysis_common import export_batches, mean
from ..layers import layer_index
from .calibration import calibration_prefix, collect_gap_stats
from .lora import PAPER_TARGETS, apply_gap_init, lora_modules, make_lora_config, normalized_gaps, random_directions
from .selection import select_layers


@torch.no_grad()
def init_alignment(peft_model: nn.Module, gaps: Mapping[int, torch.Tensor],
                   adapter: str = "default") -> dict[str, float]:
    """cos(B[:, 0], g_l) for every LoRA module whose output dim matches the gap (others skipped).

    A zero B column (PEFT's default init) gives NaN (no direction yet)."""
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
            gA = [float(mods[n].lora_A[adapter].weight.grad.norm())
                  if mods[n].lora_A[adapter].weight.grad is not None else 0.0
                  for n in mods]
            cos_vals = [c for n, c in cos.items() if n in mods and not math.isnan(c)]
            trace.append({
                "step": step,
                "loss": float(loss.detach()),
                "gap_grad": mean([vals.get(n, {}).get("gap_grad", 0.0) for n in mods]),
                "dir_grad": mean([vals.get(n, {}).get("dir_grad", 0.0) for n in mods]),
                "grad_A": mean(gA),
                "cos_b_gap": mean(cos_vals) if cos_vals else float("nan"),
                "per_module": {n: {**vals.get(n, {}), "cos_b_gap": cos.get(n, float("nan"))} for n in mods},
            })
            opt.step()
    finally:
        probe.remove()
    return trace



def gap_alignment_for_export(load: Callable[[], object], embs, texts, *, calib_samples: int = 256,
                             num_layers: int = 6, targets: Sequence[str] | None = None, r: int = 1,
                             alpha: float = 2.0, steps: int = 5, lr: float = 2e-4, batch_size: int = 8,
                             seed: int = 0, prefix_ids: Sequence[int] = ()) -> dict:
    """Gap-Init alignment on an export's LM: cos(B[:,0], g) at init and the gradient trace of the first
    ``steps`` AdamW steps for three inits of the same rank-r LoRA: ``gap`` (Gap-Init), ``random``
    (random unit direction, A = 0) and ``peft_default`` (Kaiming A, B = 0).

    ``load()`` must return a fresh ``ExportedModel`` of a projector-only export (called once per variant).
    ``embs``/``texts``: paired embeddings and captions (calibration and training batches).
    ``prefix_ids``: tokens before each calibration sequence (default BOS; see ``calibration_prefix``).
    """
    from peft import PeftModel, get_peft_model

    targets = list(targets or PAPER_TARGETS)
    base = load()
    if isinstance(base.model.lm, PeftModel):
        raise ValueError("gap alignment needs an export whose LM has no adapter (e.g. a stage-1 projector export)")
    m = base.model
    batches = export_batches(base, embs, texts, prompt=None, for_generation=False, batch_size=batch_size)
    tok = base.tokenizer
    stats = collect_gap_stats(m.lm, m.embed, batches, image_token_id=m.image_token_id,
                              num_visual_tokens=m.num_visual_tokens, pad_id=tok.pad_token_id or 0,
                              prefix_ids=calibration_prefix(prefix_ids, tok),
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
            "init_cos_mean": mean(vals) if vals else float("nan"),
            "init_abs_cos_mean": mean([abs(c) for c in vals]) if vals else float("nan"),
            "init_cos": cos0,
            "trace": [{k: v for k, v in t.items() if k != "per_module"} for t in trace],
        }
    results["expected_random_abs_cos"] = math.sqrt(2.0 / (math.pi * H))
    return results
