"""Built-in methods: ``projector`` (LM frozen), ``full`` (LM and projector train), ``lora`` (PEFT LoRA).

Learning-rate defaults follow LLaVA-1.5 ("Improved Baselines with Visual Instruction Tuning",
arXiv 2310.03744) and its released training scripts; see ``docs/METHODS.md`` for the table.
"""

from __future__ import annotations

from pathlib import Path

from .defaults import LLAVA, Default
from .layers import num_decoder_layers
from .registry import MethodContext, MethodSetup, ParamGroup, projector_groups, register_method

PROJECTOR_DEFAULTS = {
    "projector_lr": Default(1e-3, 2e-5, f"{LLAVA}: stage-1 projector pretraining lr 1e-3, stage-2 lr 2e-5; 2e-5 is "
                                        "also APP's projector-only fine-tuning lr (APP paper, Table 2)"),
}
FULL_DEFAULTS = {
    "adapter_lr": Default.same(2e-5, f"{LLAVA}: stage-2 full fine-tuning, lr 2e-5 for the LM weights"),
}
LORA_DEFAULTS = {
    "projector_lr": Default(1e-3, 2e-5, f"{LLAVA}, LoRA recipe: projector lr (mm_projector_lr) 2e-5 in stage 2; "
                                        "1e-3 in stage-1 pretraining"),
    "adapter_lr": Default.same(2e-4, f"{LLAVA}, LoRA recipe: lr 2e-4 for the adapters"),
}


def _prepare_projector(ctx: MethodContext) -> MethodSetup:
    ctx.model.freeze_lm()
    groups = projector_groups(ctx, "projector")
    return MethodSetup(groups=groups, info={"lm": "frozen"})


def _prepare_full(ctx: MethodContext) -> MethodSetup:
    lm_params = []
    for p in ctx.model.lm.parameters():
        p.requires_grad_(True)
        lm_params.append(p)
    return MethodSetup(groups=projector_groups(ctx, "full") + [ParamGroup("lm", lm_params, role="adapter")],
                       info={"lm": "full"})


def _lora_config(ctx: MethodContext):
    from peft import LoraConfig

    o = ctx.options
    layers = None
    if o["last_layers"] > 0:
        n = num_decoder_layers(ctx.model.lm)
        layers = list(range(max(0, n - o["last_layers"]), n))
    return LoraConfig(
        r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"], target_modules=list(o["targets"]),
        layers_to_transform=layers, bias="none", task_type="CAUSAL_LM",
    )


def _prepare_lora(ctx: MethodContext) -> MethodSetup:
    from peft import get_peft_model

    ctx.model.freeze_lm()
    ctx.model.lm = get_peft_model(ctx.model.lm, _lora_config(ctx))
    adapters = [p for n, p in ctx.model.lm.named_parameters() if "lora_" in n]
    for p in adapters:
        p.requires_grad_(True)
    if not adapters:
        raise ValueError(f"LoRA targets {ctx.options['targets']} matched no module of the LM")
    n_adapter = sum(p.numel() for p in adapters)
    ctx.log(f"lora: {n_adapter} adapter parameters (r={ctx.options['r']}, targets={ctx.options['targets']})")
    return MethodSetup(groups=projector_groups(ctx, "lora") + [ParamGroup("adapter", adapters, role="adapter")],
                       info={"lm": "lora", "adapter_parameters": n_adapter})


def export_peft_adapter(model, export_dir: Path, info: dict) -> None:
    """Write ``export_dir/adapter`` with PEFT's ``save_pretrained`` (safetensors)."""
    model.lm.save_pretrained(str(Path(export_dir) / "adapter"), safe_serialization=True)


def load_peft_adapter(model, export_dir: Path, config: dict) -> None:
    """Wrap ``model.lm`` with the adapter saved by :func:`export_peft_adapter`."""
    from peft import PeftModel

    model.lm = PeftModel.from_pretrained(model.lm, str(Path(export_dir) / "adapter"))


LORA_OPTIONS = {
    "r": (8, "LoRA rank"),
    "alpha": (16, "LoRA alpha (scaling alpha/r)"),
    "dropout": (0.05, "LoRA dropout"),
    "targets": (["q_proj", "k_proj", "v_proj", "o_proj"], "comma-separated target module names"),
    "last_layers": (0, "adapt only the last N decoder layers (0 = all)"),
}

register_method("projector", _prepare_projector, defaults=PROJECTOR_DEFAULTS,
                description="train the projector only; the LM stays frozen (stage 1, APP)")
register_method("full", _prepare_full, trains_lm_weights=True, defaults=FULL_DEFAULTS,
                description="train the whole LM (role adapter, --adapter-lr) and the projector (--lr)")
register_method("lora", _prepare_lora, export=export_peft_adapter, load=load_peft_adapter, options=LORA_OPTIONS,
                defaults=LORA_DEFAULTS, description="PEFT LoRA on the LM (--adapter-lr) plus the projector (--lr)")
