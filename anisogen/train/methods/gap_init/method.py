"""Gap-Init as a trainer method (``--method gap_init``): options, per-stage defaults, ``prepare``."""

from __future__ import annotations

from ..builtin import export_peft_adapter, load_peft_adapter
from ..defaults import Default
from ..layers import decoder_layers
from ..registry import MethodSetup, ParamGroup, projector_groups, register_method
from .calibration import calibration_prefix, collect_gap_stats
from .lora import (
    PAPER_TARGETS, apply_gap_init, linear_out_features, make_lora_config, normalized_gaps, random_directions,
)
from .selection import select_layers, spot_gap_scores

GAP_INIT_PAPER = ("Gap-Init, 'When Is Rank-1 Enough? Geometry-Guided Initialization for Parameter-Efficient "
                  "Fine-Tuning' (arXiv 2602.01522)")

#: Per-stage defaults (see ..defaults); the projector lr (base default) only matters with freeze_projector=False.
GAP_INIT_DEFAULTS = {
    "adapter_lr": Default.same(2e-4, f"{GAP_INIT_PAPER}, Table 14: AdamW lr 2e-4, cosine decay"),
    "freeze_projector": Default.same(True, f"{GAP_INIT_PAPER}, appendix G.1: the alignment module (Q-Former) is "
                                           "frozen in all Gap-Init experiments; only the LoRA adapters train"),
}


GAP_INIT_OPTIONS = {
    "r": (1, "LoRA rank (paper: 1)"),
    "alpha": (2.0, "LoRA alpha (paper: 2 for r=1)"),
    "dropout": (0.05, "LoRA dropout"),
    "targets": (list(PAPER_TARGETS),
                "comma-separated target module names (Gap-Init where out_features == hidden size)"),
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
        tok = ctx.tokenizer
        prefix = calibration_prefix(ctx.prefix_ids, tok) if o["calib_mode"] == "separate" else []
        batches = ctx.calibration(int(o["calib_samples"]))
        stats = collect_gap_stats(
            lm, elm.embed, batches, image_token_id=elm.image_token_id, num_visual_tokens=elm.num_visual_tokens,
            pad_id=getattr(tok, "pad_token_id", None) or 0, prefix_ids=prefix, mode=o["calib_mode"], point=o["point"],
            max_samples=int(o["calib_samples"]), source="train", device=ctx.device,
        )
        info["calibration"] = stats.describe()
        info["calibration"]["prefix_ids"] = prefix
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
    groups = projector_groups(ctx, "gap_init") + [ParamGroup("adapter", adapters, role="adapter")]
    return MethodSetup(groups=groups, info=info)


def register() -> None:
    register_method(
        "gap_init", _prepare_gap_init, export=export_peft_adapter, load=load_peft_adapter, options=GAP_INIT_OPTIONS,
        defaults=GAP_INIT_DEFAULTS, reads_lm_at_setup=True,
        description="rank-1 PEFT LoRA with B[:,0] along the calibrated modality gap and A=0 (Gap-Init); "
                    "projector frozen by default",
    )
