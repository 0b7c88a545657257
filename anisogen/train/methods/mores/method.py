"""MoReS as a trainer method (``--method mores``): binding to an EmbeddingLM, options, defaults, hooks."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..defaults import Default
from ..layers import decoder_layers
from ..registry import MethodSetup, ParamGroup, projector_groups, register_method
from .model import MoReS, parameter_summary
from .positions import POSITIONS_HELP

MORES_SOURCE = ("MoReS authors' released stage-2 script (LLaVA-Steering, for 'Visual Instruction Tuning with 500x "
                "Fewer Parameters through Modality Linear Representation-Steering', arXiv 2412.12359)")

#: One learning rate for everything trainable, as in the authors' script: --learning_rate 2e-4 with the connector
#: tuned in full and no separate connector lr; weight decay 0. Stage 1 keeps LLaVA's projector pretraining lr.
MORES_DEFAULTS = {
    "adapter_lr": Default.same(2e-4, f"{MORES_SOURCE}: learning rate 2e-4 for the steering parameters"),
    "projector_lr": Default(1e-3, 2e-4, f"{MORES_SOURCE}: the connector trains at the same 2e-4 in stage 2 (no "
                                        "separate connector lr); stage 1: the authors' pretraining lr 1e-3 (= LLaVA)"),
    "weight_decay": Default.same(0.0, f"{MORES_SOURCE}: weight decay 0"),
}


def bind_embedding_lm(elm: nn.Module, mores: MoReS) -> None:
    """Steer ``elm`` (an ``EmbeddingLM``) with ``mores``: hooks on ``elm.lm``'s decoder layers, and a
    visual-mask hook (:meth:`EmbeddingLM.register_visual_mask_hook`) so that every ``embed`` call (the
    single path of ``forward`` and ``generate``) hands its placeholder mask to the MoReS position policy.

    ``mores`` becomes ``elm.extras["mores"]`` (so checkpoints and exports hold it); a different MoReS
    bound before is unbound. Idempotent.
    """
    prev = elm.extras["mores"] if "mores" in elm.extras else None
    if prev is not None and prev is not mores:
        prev.unbind()
    if mores._embed_handle is not None and mores._embed_handle[0] != id(elm):
        mores.unbind()  # it steered another model before
    elm.extras["mores"] = mores
    mores.attach(elm.lm)
    if mores._embed_handle is None:
        mores._embed_handle = (id(elm), elm.register_visual_mask_hook(mores.set_visual_mask))


MORES_OPTIONS = {
    "rank": (1, "subspace rank r (paper: 1)"),
    "layers": ("all", "decoder layers to steer: all | comma-separated indices"),
    "positions": ("ratio:0.01", f"steered visual positions: {POSITIONS_HELP}"),
    "dropout": (0.05, "dropout probability"),
    "dropout_on": ("delta", "delta (h + dropout(delta); residual stream never dropped) | output (authors' code: "
                            "dropout(h + delta))"),
    "init_identity": (False, "start as the identity (W = R, b = 0)"),
    "trivialization": (False, "use_trivialization of the orthogonal parametrization (stores a D x D base)"),
    "seed": (0, "seed of the intervention initialisation"),
}


def _build_from_options(elm, o: dict) -> MoReS:
    L = len(decoder_layers(elm.lm))
    layers = (
        None if str(o["layers"]).strip() in ("all", "") else [int(x) for x in str(o["layers"]).split(",") if x.strip()]
    )
    return MoReS(elm.hidden_size, L, rank=int(o["rank"]), dropout=float(o["dropout"]), dropout_on=o["dropout_on"],
                 init_identity=bool(o["init_identity"]), trivialization=bool(o["trivialization"]), layers=layers,
                 positions=o["positions"])


def _prepare_mores(ctx):
    o = ctx.options
    elm = ctx.model
    elm.freeze_lm()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(o["seed"]))
        mores = _build_from_options(elm, o)
    mores.to(ctx.device)
    bind_embedding_lm(elm, mores)
    counts = parameter_summary(elm.lm, mores)
    if counts["mores"] != counts["mores_formula"]:
        raise AssertionError(f"MoReS parameter count {counts['mores']} != L*r(2D+1) = {counts['mores_formula']}")
    ctx.log(f"mores: {counts['mores']} trainable steering parameters (L*r(2D+1)); LoRA on the same LM: "
            f"{counts['lora']} (r={counts['lora_r']}, {','.join(counts['lora_targets'])}), {counts['lora_rank1']} at "
            f"r=1")
    rot, lin = mores.param_groups()
    groups = projector_groups(ctx, "mores") + [
        ParamGroup("steering_rotation", rot, role="adapter", weight_decay=0.0),
        ParamGroup("steering_linear", lin, role="adapter", weight_decay=0.0),
    ]
    return MethodSetup(groups=groups, info={"lm": "frozen", "mores": mores.config, "parameter_counts": counts})


def _export_mores(model, export_dir: Path, info: dict) -> None:
    model.extras["mores"].save(Path(export_dir) / "steering.safetensors")


def _load_mores(model, export_dir: Path, config: dict) -> None:
    mores = MoReS.load(Path(export_dir) / "steering.safetensors")
    bind_embedding_lm(model, mores)


def register() -> None:
    register_method("mores", _prepare_mores, export=_export_mores, load=_load_mores, options=MORES_OPTIONS,
                    defaults=MORES_DEFAULTS,
                    description="MoReS/LoReFT steering h + R^T(Wh + b - Rh) at visual positions of every layer; LM "
                                "frozen")
