"""The Gap-Init LoRA: PEFT configuration, unit gap directions and the ``A = 0, B[:, 0] = g/||g||`` overwrite."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from ..layers import layer_index

#: Llama names of the paper's targets (OPT q,k,v,o_proj + fc1/fc2 -> gate/up/down_proj).
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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



def linear_out_features(lm: nn.Module, targets: Sequence[str], layers: Sequence[int]) -> dict[str, int]:
    """Full module name -> out_features for every ``nn.Linear`` named like ``targets`` in ``layers``."""
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

    if mismatch not in ("peft_init", "raise"):
        raise ValueError(
            f"mismatch must be 'peft_init' or 'raise' (use make_lora_config(exclude=...) to exclude), got {mismatch!r}"
        )
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

    return {
        n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})
    }

