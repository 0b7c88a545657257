"""MoReS: Modality Linear Representation-Steering (LoReFT form) at visual positions.

Paper: "LLaVA Steering: Visual Instruction Tuning with 500x Fewer Parameters through Modality Linear
Representation-Steering" (Bi et al., ACL 2025, arXiv 2412.12359), §4 eqs. 3-4 and App. A.1, read together
with the authors' public code (``bibisbar/LLaVA-Steering``); our choices are listed in ``docs/METHODS.md``. The paper's
``W_up . (Linear(h) - W_down h)`` with ``W_up = W_down^T = R^T`` (orthonormal rows; the stated
``W_down W_up^T = I_D`` is a typo for ``R R^T = I_r``) is exactly LoReFT::

    h' = h + R^T (W h + b - R h),      R in R^{r x D}, R R^T = I_r,  W in R^{r x D},  b in R^r

applied to the output of every decoder block (the residual stream), only at selected visual positions,
with the LLM frozen. Each layer has its own intervention, so the trainable count is ``L * r(2D+1)``
(Phi-2: 32 * 5121 = 0.164M, the paper's figure).

Implementation choices (named options, see ``docs/METHODS.md``):

* ``R`` is ``nn.Linear(D, r).weight`` under ``torch.nn.utils.parametrizations.orthogonal`` (Householder,
  always float32, computed with autocast disabled). ``trivialization=False`` (default) keeps the whole
  state in the (r, D) parameter (no D x D buffer, exact resume); ``True`` is the torch/pyreft default.
* ``dropout_on="delta"`` (default: ``h + dropout(delta)``, so that dropout never touches the residual
  stream) or ``"output"`` (faithful to the authors' code: ``dropout(h + delta)`` at steered positions).
  The faithful placement zeroes 5% of the coordinates of the whole residual vector of every steered
  token at every layer. With one visual token per sample, whose residual stream concentrates most of
  its norm in a few massive coordinates (SmolLM2-135M: 61% of ||h||^2 in 2 of 576 dims at layer 15),
  that is a heavy random corruption of the image information: the train-mode loss of one SmolLM2
  batch is 3.74 on average over 8 dropout draws (range 2.75-5.13) against 2.78 without dropout, and a
  24-step instruction run did not lower the loss (2.877 -> 2.911). ``delta`` keeps the train-mode
  loss within 0.03 of the eval loss. Choose ``output`` to reproduce the authors exactly (e.g. many
  visual tokens, of which only ~1% are steered).
* ``init_identity=True`` sets ``W = R, b = 0`` so that the intervention starts as the identity (our
  extension; the paper's ``W`` is a random ``nn.Linear``).
* positions: ``ratio:F`` (``max(1, round(F * n_visual))`` evenly spaced visual tokens; default
  ``ratio:0.01``), ``f{n}+l{m}`` (first n and last m visual tokens, the authors' ``f4+l5``),
  ``uniform{n}`` or ``all``. Selection works on a (B, T) boolean visual mask, so it is independent of
  the padding side.
* Hooks are no-ops when no mask is set, and on KV-cache decode steps (sequence length != mask length).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrizations

from .gap_init import block_hidden, decoder_layers, replace_block_hidden

POSITIONS_HELP = "ratio:F (>= 1 token) | f{n}+l{m} (first n, last m visual tokens) | uniform{n} | all"
_FL_RE = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


# --------------------------------------------------------------------------------------------------- positions


def select_positions(visual_mask: torch.Tensor, policy: str = "ratio:0.01") -> torch.Tensor:
    """Steered positions among each row's visual positions.

    Args:
        visual_mask: (B, T) bool, True at visual (placeholder) positions; any padding side.
        policy: see ``POSITIONS_HELP``. Ranks are counted among the visual positions of each row, so
            the selection does not depend on where the row starts.
    Returns:
        (B, T) bool, a subset of ``visual_mask``; every row with >= 1 visual token gets >= 1 position.
    """
    vm = visual_mask.bool()
    if vm.dim() != 2:
        raise ValueError(f"visual mask must be (B, T), got shape {tuple(vm.shape)}")
    count = vm.sum(1, keepdim=True)  # (B,1)
    rank = torch.cumsum(vm.long(), 1) - 1  # index of each visual token within its row
    policy = policy.strip().lower()
    if policy == "all":
        return vm.clone()
    if policy.startswith("ratio:") or policy.startswith("uniform"):
        if policy.startswith("ratio:"):
            try:
                frac = float(policy.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad positions policy {policy!r}: expected {POSITIONS_HELP}") from None
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"positions ratio must be in (0, 1], got {frac}")
            n = torch.clamp(torch.round(count.double() * frac).long(), min=1)
        else:
            try:
                n = torch.full_like(count, int(policy[len("uniform"):]))
            except ValueError:
                raise ValueError(f"bad positions policy {policy!r}: expected {POSITIONS_HELP}") from None
            if int(n.min()) < 1:
                raise ValueError("uniform{n} needs n >= 1")
        n = torch.minimum(n, count.clamp(min=1))
        # evenly spaced picks: visual rank j is selected when it equals round(i * (c-1) / (n-1)) for some i
        sel = torch.zeros_like(vm)
        c = count.squeeze(1)
        for b in range(vm.shape[0]):
            cb, nb = int(c[b]), int(n[b, 0])
            if cb == 0:
                continue
            if nb == 1:
                picks = torch.tensor([(cb - 1) // 2])
            else:
                picks = torch.round(torch.arange(nb, dtype=torch.float64) * (cb - 1) / (nb - 1)).long()
            sel[b] = vm[b] & torch.isin(rank[b], picks.to(rank.device))
        return sel
    m = _FL_RE.match(policy)
    if m and (m.group(1) or m.group(2)):
        first = int(m.group(1) or 0)
        last = int(m.group(2) or 0)
        return vm & ((rank < first) | (rank >= count - last))
    raise ValueError(f"bad positions policy {policy!r}: expected {POSITIONS_HELP}")


# --------------------------------------------------------------------------------------------------- intervention


class SteeringIntervention(nn.Module):
    """One LoReFT-form intervention ``h' = h + R^T (W h + b - R h)`` (float32).

    Args:
        dim: D, the hidden size. rank: r (paper: 1).
        dropout: probability (authors: 0.05). dropout_on: ``delta`` (default) | ``output`` (faithful).
        init_identity: start with ``W = R, b = 0`` (identity map).
        trivialization: ``use_trivialization`` of the orthogonal parametrization (see module doc).
    Parameters: ``rotate.parametrizations.weight.original`` (r, D), ``proj.weight`` (r, D),
    ``proj.bias`` (r,): r(2D+1) in total.
    """

    def __init__(self, dim: int, rank: int = 1, *, dropout: float = 0.05, dropout_on: str = "delta",
                 init_identity: bool = False, trivialization: bool = False):
        super().__init__()
        if not 1 <= rank <= dim:
            raise ValueError(f"rank must be in [1, {dim}], got {rank}")
        if dropout_on not in ("output", "delta"):
            raise ValueError(f"dropout_on must be 'output' or 'delta', got {dropout_on!r}")
        self.dim, self.rank, self.dropout_on = int(dim), int(rank), dropout_on
        rot = nn.Linear(dim, rank, bias=False, dtype=torch.float32)
        nn.init.orthogonal_(rot.weight)
        self.rotate = parametrizations.orthogonal(rot, "weight", orthogonal_map="householder",
                                                  use_trivialization=trivialization)
        self.proj = nn.Linear(dim, rank, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout)
        if init_identity:
            self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        """``W <- R``, ``b <- 0``: the intervention becomes the identity."""
        self.proj.weight.copy_(self.R)
        self.proj.bias.zero_()

    @property
    def R(self) -> torch.Tensor:
        """(r, D) float32 with orthonormal rows (materialised from the parametrization)."""
        return self.rotate.weight

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``R^T (W h + b - R h)`` for float32 ``h`` (..., D) -> (..., D)."""
        R = self.R
        return (self.proj(h) - h @ R.T) @ R

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Steer every row of ``h`` (..., D); computed in float32 and cast back to ``h.dtype``."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            d = self.delta(x)
            out = self.dropout(x + d) if self.dropout_on == "output" else x + self.dropout(d)
        return out.to(h.dtype)


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
    from .methods import layer_index

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


# --------------------------------------------------------------------------------------------------- trainer glue


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
    layers = None if str(o["layers"]).strip() in ("all", "") else [int(x) for x in str(o["layers"]).split(",") if x.strip()]
    return MoReS(elm.hidden_size, L, rank=int(o["rank"]), dropout=float(o["dropout"]), dropout_on=o["dropout_on"],
                 init_identity=bool(o["init_identity"]), trivialization=bool(o["trivialization"]), layers=layers,
                 positions=o["positions"])


def _prepare_mores(ctx):
    from .methods import MethodSetup, ParamGroup, projector_groups

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
            f"{counts['lora']} (r={counts['lora_r']}, {','.join(counts['lora_targets'])}), {counts['lora_rank1']} at r=1")
    rot, lin = mores.param_groups()
    groups = projector_groups(ctx) + [
        ParamGroup("steering_rotation", rot, role="adapter", weight_decay=0.0),
        ParamGroup("steering_linear", lin, role="adapter", weight_decay=0.0),
    ]
    return MethodSetup(groups=groups, info={"lm": "frozen", "mores": mores.config, "parameter_counts": counts})


def _export_mores(model, export_dir: Path, info: dict) -> None:
    model.extras["mores"].save(Path(export_dir) / "steering.safetensors")


def _load_mores(model, export_dir: Path, config: dict) -> None:
    mores = MoReS.load(Path(export_dir) / "steering.safetensors")
    bind_embedding_lm(model, mores)


def _register() -> None:
    from .methods import register_method

    register_method("mores", _prepare_mores, export=_export_mores, load=_load_mores, options=MORES_OPTIONS,
                    description="MoReS/LoReFT steering h + R^T(Wh + b - Rh) at visual positions of every layer; LM frozen")


_register()
