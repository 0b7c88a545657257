"""APP: Anchor-Preserving Projection (spectral filtering of the projector task vector).

Modules: ``config`` (AppConfig, spec parsing), ``merge`` (the math), ``io`` (files, ``merge_files``),
``post`` (``--post app`` and its refusals), ``spectrum`` (the appendix-A analysis).

Paper: "The Dominance of Text Space: Unveiling the Asymmetric Nature of Cross-Modal Alignment in Large
Language Models" (Chen et al., PatSnap), §4.1-4.3 and Alg. 1; each choice where it is ambiguous is a named
option, listed in ``docs/METHODS.md``.

For every 2-D weight matrix of the projector (``mlp2x_gelu``: ``0.weight`` and ``2.weight``)::

    tau      = W_ft - W_pre                          (eq. 5 left side; float64 on CPU)
    tau      = U diag(s) V^T                         (eq. 5, s descending)
    tau_k    = U[:, :k] diag(s[:k]) V^T[:k, :]       (eq. 6; Alg. 1 lines 5-8 with the slicing typos fixed)
    W_merged = W_pre + alpha * tau_k                 (eq. 7)

``k`` comes from one of two rules (``mode``):

``ratio``   ``k = floor(rank(tau) * k_ratio)`` (Alg. 1 line 3, ``k_ratio`` default 0.25, Table 2).
``energy``  the smallest ``k`` with ``sum_{i<=k} s_i^2 / sum_i s_i^2 >= energy`` (§5.4, default 0.8;
            energy measured with s^2 as in appendix A).

both clamped to ``[min_k, rank]`` (``min_k`` default 1). ``rank(tau)`` is the numerical rank with the
``torch.linalg.matrix_rank`` tolerance ``s_max * max(m, n) * eps(float64)``.

Other merge modes on the same state dicts: ``naive`` (the plain task vector, the paper's TV baseline:
``W_pre + alpha * tau``) and ``ties`` (single-task TIES-Merging: keep the ``density`` fraction of
largest-magnitude entries of ``tau``; with one task the sign election is a no-op).

Non-matrix tensors (biases) cannot be SVD-filtered; ``bias_policy`` decides:

``full``  (default) ``b_pre + alpha * delta_b``: the full bias delta (as TSV-C keeps non-matrix params).
``drop``  ``b_pre``: the bias delta is discarded.
``scale`` ``b_pre + alpha * rho * delta_b`` where ``rho = ||tau_k||_F / ||tau||_F`` of the sibling
          ``.weight`` matrix (the fraction of the update norm the weight kept); ``bias_scale`` overrides
          ``rho`` with a constant.

Per-layer selection: ``include`` (a regex or a list of tensor names) chooses which matrices are
filtered; unselected matrices receive the full delta (``W_pre + alpha * tau``, what the paper's
layer-sensitivity ablation B.1 compares against).
"""

from __future__ import annotations

from .config import (
    APP_SPEC_HELP, BIAS_POLICIES, DEFAULT_RULE, MODES, POST_FLAGS, AppConfig, export_slug, parse_app_spec,
    split_post_spec,
)
from .io import coadapted_parts, load_state, merge_files, resolve_projector_file, summarize
from .merge import app_merge, choose_k, numerical_rank, svd_truncate, task_vector, ties_trim
from .post import check_app_run, register, run_app_post
from .spectrum import projector_spectrum

register()

__all__ = [
    "APP_SPEC_HELP", "BIAS_POLICIES", "DEFAULT_RULE", "MODES", "POST_FLAGS", "AppConfig", "app_merge",
    "check_app_run", "choose_k", "coadapted_parts", "export_slug", "load_state", "merge_files", "numerical_rank",
    "parse_app_spec", "projector_spectrum", "resolve_projector_file", "run_app_post", "split_post_spec",
    "summarize", "svd_truncate", "task_vector", "ties_trim",
]
