"""Decoder-layer helpers shared by the methods and their analyses.

They work on any HF causal LM, also through PEFT and :class:`~anisogen.train.model.EmbeddingLM`
wrappers: finding the decoder-block list, parsing a layer index out of a module name, and reading or
replacing the hidden-state tensor of a block's output (a bare tensor or a tuple, depending on the
transformers version and model).
"""

from __future__ import annotations

import torch
from torch import nn

#: Names of the decoder-block ``ModuleList`` across HF architectures.
LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")


def layer_index(module_name: str) -> int | None:
    """Decoder layer index parsed from a module name (``...layers.7.self_attn.q_proj`` -> 7)."""
    parts = module_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in LAYER_LIST_NAMES and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def num_decoder_layers(lm) -> int:
    """``config.num_hidden_layers`` of an HF LM; raises when the config does not tell."""
    cfg = getattr(lm, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise ValueError("cannot tell the number of decoder layers of this LM (config.num_hidden_layers)")
    return int(n)


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
