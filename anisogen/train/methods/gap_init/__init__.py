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

Modules: ``calibration`` (hooks, :class:`GapStats`, the calibration prefix), ``selection`` (SPOT-Gap,
layer choice), ``lora`` (PEFT config, directions, the overwrite), ``method`` (``--method gap_init``,
defaults: adapters 2e-4, projector frozen) and ``analysis`` (init alignment, gradient trace).
"""

from __future__ import annotations

from ..layers import block_hidden, decoder_layers, replace_block_hidden
from .analysis import gap_alignment_for_export, gradient_trace, init_alignment
from .calibration import IGNORE_INDEX, GapStats, calibration_prefix, collect_gap_stats, masked_layer_means
from .lora import (
    PAPER_TARGETS, apply_gap_init, linear_out_features, lora_modules, make_lora_config, normalized_gaps,
    random_directions,
)
from .method import GAP_INIT_DEFAULTS, GAP_INIT_OPTIONS, register
from .selection import select_layers, spot_gap_scores

register()

__all__ = [
    "GAP_INIT_DEFAULTS", "GAP_INIT_OPTIONS", "IGNORE_INDEX", "PAPER_TARGETS", "GapStats", "apply_gap_init",
    "block_hidden", "calibration_prefix", "collect_gap_stats", "decoder_layers", "gap_alignment_for_export",
    "gradient_trace", "init_alignment", "linear_out_features", "lora_modules", "make_lora_config",
    "masked_layer_means", "normalized_gaps", "random_directions", "replace_block_hidden", "select_layers",
    "spot_gap_scores",
]
