"""The MoReS module: per-layer interventions hooked onto decoder-block outputs, save/load, counts."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..layers import block_hidden, decoder_layers, layer_index, replace_block_hidden
from .layer import SteeringIntervention
from .positions import select_positions


class MoReS(nn.Module):
    """Per-layer steering interventions attached to decoder-block outputs by forward hooks.

    Args:
        dim: hidden size D. num_layers: L of the LM.
        rank, dropout, dropout_on, init_identity, trivialization: per intervention.
        layers: decoder-layer indices to steer (default all, as the paper).
        positions: default selection policy applied by :meth:`steer` (``POSITIONS_HELP``).
    Usage::

        mores = MoReS(D, L).attach(lm)           # hooks on lm's decoder layers
        with mores.steer(visual_mask):           # (B, T) bool; the policy picks the steered subset
            out = lm(inputs_embeds=..., attention_mask=...)
    """

    def __init__(self, dim: int, num_layers: int, *, rank: int = 1, dropout: float = 0.05, dropout_on: str = "delta",
                 init_identity: bool = False, trivialization: bool = False, layers: Sequence[int] | None = None,
                 positions: str = "ratio:0.01"):
        super().__init__()
        layers = list(range(num_layers)) if layers is None else sorted(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoReS layers {bad} out of range for a {num_layers}-layer model")
        select_positions(torch.zeros(1, 1, dtype=torch.bool), positions)  # validate the policy early
        self.config = {"dim": int(dim), "num_layers": int(num_layers), "rank": int(rank), "dropout": float(dropout),
                       "dropout_on": dropout_on, "init_identity": bool(init_identity),
                       "trivialization": bool(trivialization), "layers": layers, "positions": positions}
        self.interventions = nn.ModuleDict({
            str(i): SteeringIntervention(dim, rank, dropout=dropout, dropout_on=dropout_on,
                                         init_identity=init_identity, trivialization=trivialization)
            for i in layers
        })
        self.positions = positions
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        self._embed_handle = None  # (id of the EmbeddingLM, handle of its visual-mask hook): bind_embedding_lm

    # ---- hooks
    def attach(self, model: nn.Module | nn.ModuleList) -> "MoReS":
        """Register forward hooks on the decoder layers of ``model`` (an HF LM, PEFT model, or the
        ``ModuleList`` itself). Returns self."""
        self.detach()
        blocks = model if isinstance(model, nn.ModuleList) else decoder_layers(model)
        if len(blocks) != self.config["num_layers"]:
            raise ValueError(f"model has {len(blocks)} decoder layers, MoReS was built for {self.config['num_layers']}")
        for key in self.interventions:
            self._handles.append(blocks[int(key)].register_forward_hook(self._make_hook(key)))
        return self

    def detach(self) -> None:
        """Remove the decoder-layer hooks (the LM runs unsteered)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def unbind(self) -> None:
        """Undo :func:`bind_embedding_lm`: remove the layer hooks and the visual-mask hook, clear the mask."""
        self.detach()
        if self._embed_handle is not None:
            self._embed_handle[1].remove()
            self._embed_handle = None
        self._mask = None

    def _make_hook(self, key: str):
        def hook(module, args, output):
            mask = self._mask
            if mask is None:
                return None
            h = block_hidden(output)
            if h.dim() != 3 or h.shape[1] != mask.shape[1]:
                return None  # KV-cache decode step (or an unrelated call): nothing to steer
            if h.shape[0] != mask.shape[0]:
                if h.shape[0] % mask.shape[0]:
                    raise ValueError(f"steering mask batch {mask.shape[0]} does not divide hidden batch {h.shape[0]}")
                mask = mask.repeat_interleave(h.shape[0] // mask.shape[0], dim=0)  # beam expansion
            idx = mask.to(h.device).nonzero(as_tuple=True)
            if idx[0].numel() == 0:
                return None
            new = self.interventions[key](h[idx])
            return replace_block_hidden(output, h.index_put(idx, new))
        return hook

    # ---- masks
    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Set the exact (B, T) bool steering mask for the following forwards (None = no steering).

        The mask stays set until replaced: gradient-checkpoint recomputation during backward must
        see the same mask as the forward."""
        self._mask = None if mask is None else mask.bool()

    def set_visual_mask(self, visual_mask: torch.Tensor | None, positions: str | None = None) -> None:
        """Apply the position policy to a (B, T) visual mask and set the result."""
        self.set_mask(None if visual_mask is None else select_positions(visual_mask, positions or self.positions))

    @contextlib.contextmanager
    def steer(self, visual_mask: torch.Tensor, positions: str | None = None):
        """Context manager: steer the policy-selected subset of ``visual_mask`` inside the block."""
        prev = self._mask
        self.set_visual_mask(visual_mask, positions)
        try:
            yield self
        finally:
            self._mask = prev

    # ---- parameters
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(rotation parameters, W/b parameters). Rotation parameters must get weight_decay = 0:
        the Householder diagonal carries signs (+-1) that receive no gradient."""
        rot, lin = [], []
        for n, p in self.named_parameters():
            (rot if ".rotate." in f".{n}" else lin).append(p)
        return rot, lin

    # ---- materialised weights
    def steering_state(self) -> dict[str, torch.Tensor]:
        """``{layer}.R`` (r, D), ``{layer}.W`` (r, D), ``{layer}.b`` (r,): float32 CPU copies."""
        out = {}
        for k, m in self.interventions.items():
            out[f"{k}.R"] = m.R.detach().float().cpu().contiguous()
            out[f"{k}.W"] = m.proj.weight.detach().float().cpu().contiguous()
            out[f"{k}.b"] = m.proj.bias.detach().float().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_steering_state(self, sd: dict[str, torch.Tensor]) -> None:
        """Load :meth:`steering_state` tensors; R is re-parametrized (its rows must be orthonormal)."""
        want = set(self.steering_state())
        if set(sd) != want:
            missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
            raise KeyError(f"steering weights do not match this MoReS: missing {missing[:4]}, unexpected {extra[:4]}")
        for k, m in self.interventions.items():
            R = sd[f"{k}.R"].float()
            gram = R @ R.T
            err = float((gram - torch.eye(R.shape[0])).abs().max())
            if err > 1e-4:
                raise ValueError(f"layer {k}: stored R does not have orthonormal rows (max |RR^T - I| = {err:.2e})")
            dev = m.proj.weight.device
            m.rotate.weight = R.to(dev)
            m.proj.weight.copy_(sd[f"{k}.W"])
            m.proj.bias.copy_(sd[f"{k}.b"])

    def save(self, path: str | Path) -> Path:
        """Write materialised weights + config (safetensors metadata ``mores_config``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        save_file(self.steering_state(), str(tmp), metadata={"mores_config": json.dumps(self.config, sort_keys=True)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MoReS":
        """Rebuild a MoReS from :meth:`save` output (not yet attached)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "mores_config" not in meta:
                raise ValueError(f"{path}: not a MoReS steering file (no mores_config metadata)")
            cfg = json.loads(meta["mores_config"])
            sd = {k: f.get_tensor(k) for k in f.keys()}
        m = cls(cfg["dim"], cfg["num_layers"], rank=cfg["rank"], dropout=cfg["dropout"], dropout_on=cfg["dropout_on"],
                init_identity=False, trivialization=cfg["trivialization"], layers=cfg["layers"],
                positions=cfg["positions"])
        m.load_steering_state(sd)
        return m


# --------------------------------------------------------------------------------------------------- counts


def mores_parameter_count(num_layers: int, dim: int, rank: int = 1) -> int:
    """``L * r * (2D + 1)``."""
    return int(num_layers) * int(rank) * (2 * int(dim) + 1)


def lora_parameter_count(lm: nn.Module, r: int, targets: Sequence[str], layers: Sequence[int] | None = None) -> int:
    """LoRA trainable count ``sum r * (in + out)`` over ``nn.Linear`` modules named like ``targets``."""
    total = 0
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            if layers is not None and layer_index(name) not in layers:
                continue
            total += int(r) * (mod.in_features + mod.out_features)
    return total


def parameter_summary(lm: nn.Module, mores: MoReS, *, lora_r: int = 8,
                      lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> dict:
    """MoReS vs LoRA trainable counts on the same LM (printed at startup)."""
    cfg = mores.config
    return {
        "mores": mores.num_parameters(),
        "mores_formula": mores_parameter_count(len(cfg["layers"]), cfg["dim"], cfg["rank"]),
        "lora": lora_parameter_count(lm, lora_r, lora_targets),
        "lora_r": int(lora_r),
        "lora_targets": list(lora_targets),
        "lora_rank1": lora_parameter_count(lm, 1, lora_targets),
    }

