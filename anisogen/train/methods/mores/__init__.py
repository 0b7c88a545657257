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

Modules: ``positions`` (position policies), ``layer`` (:class:`SteeringIntervention`), ``model``
(:class:`MoReS`, parameter counts), ``method`` (``--method mores``, defaults: one lr 2e-4 for steering
and projector in stage 2, weight decay 0) and ``lmar`` (the LMAR analysis, eq. 2).
"""

from __future__ import annotations

from .layer import SteeringIntervention
from .lmar import eager_attention, lmar, lmar_for_export, modality_attention, write_lmar_report
from .method import MORES_DEFAULTS, MORES_OPTIONS, bind_embedding_lm, register
from .model import MoReS, lora_parameter_count, mores_parameter_count, parameter_summary
from .positions import POSITIONS_HELP, select_positions

register()

__all__ = [
    "MORES_DEFAULTS", "MORES_OPTIONS", "POSITIONS_HELP", "MoReS", "SteeringIntervention", "bind_embedding_lm",
    "eager_attention", "lmar", "lmar_for_export", "lora_parameter_count", "modality_attention",
    "mores_parameter_count", "parameter_summary", "select_positions", "write_lmar_report",
]
