"""AnisoAlign (arXiv 2605.07825, spec §2), its paper-exact form and its Table-4 ablations, as registered aligners.

Fitting (unpaired text and image embeddings, spec §2.10; :meth:`AnisoAlign._fit_stages` reads as this list):

1. Frame (:mod:`.frame`): Sigma = Sigma_t + Sigma_i + lambda I from the streaming float64 moments; Q_U = top-r
   sign-fixed eigenvectors, Q_V the rest; mixing R (Haar by default); B = Q_U R.
2. Statistic-estimation sample: up to ``max_train_samples`` images and texts, drawn uniformly in one
   streaming pass each (:func:`.training.reservoir_sample`), plus ``select_size`` held-out rows of each
   (at most a quarter of the sample): Stage I's validation images and the selection's texts and images.
3. Stage I statistics (:mod:`.prior`): image polar coordinates of B^T x (raw x) -> psi, alpha, M -> (A, eta), graph E.
4. Stage II-a (:mod:`.init`): radial quantile maps T_k, D_V (with its variance floor ``v_floor``), the global
   map's scales, and the shrinkage gamma toward that global map.
5. Stage I training: the score network s_phi by wrapped-Gaussian DSM (eq. 6), stopped on a plateau of the
   held-out L_I (after ``stage1_lr_decays`` learning-rate decays); frozen.
6. Stage II-b (:mod:`.refine`): g_eta trained on the text initial states with the variant's objective;
   with ``select="auto"`` (the default of ``anisoalign``), :mod:`.select` chooses gamma, lambda_Phi and the
   bounds on the held-out fit rows (one refiner per lambda_Phi candidate, bounds applied by scaling).
7. Final centroid calibration (shared with ReAlign, :class:`anisogen.align.base.Aligner`): mu_hat = mean of
   Norm(e') over the fit texts, stored; every transform returns e = Norm(Norm(e') - mu_hat + mu_i).

Transform (deterministic, row-wise, batch-independent): global init -> g_eta -> bounded update (eq. 7) ->
e' = B c_hat + v_hat (spec §2.9). Rows are processed in fixed-shape, zero-padded blocks of
``transform_block`` rows so every BLAS call has the same shape whatever the batch: a row's output bits do
not depend on which other rows are transformed with it. ``device_transform`` (:mod:`anisogen.align.device`)
is the same map in float32 torch on any device (:meth:`AnisoAlign._map_torch`, the functions at the end of
this module), also in fixed-shape blocks.

Variants (Table 4; the objective of g_eta):

=====================  ==========================================================================
``anisoalign``         automatic selection (``select="auto"``) of gamma, lambda_Phi and data-scaled bounds;
                       L_II + lambda_Phi L_Phi with L_Phi summed over E (``phase_normalization="sum"``)
``anisoalign-paper``   the paper as the spec reads it: gamma = 1, eq.-9 L_Phi, alpha = (0.2, 0.1, 0.002),
                       no D_V floor, no selection
``anisoalign-init``    global initialisation only (paper settings), no Stage I training, no g_eta
``anisoalign-refine``  "guidance" reading (default): g_eta trained with L_G; "objectives" reading: with
                       1e-3 ||tanh(.)||^2 only (spec Q3), stationary at the zero head, so equal to the init
``anisoalign-prior``   L_II only (Stage I trained)
``anisoalign-phase``   "guidance": L_G + lambda_Phi L_Phi; "objectives": lambda_Phi L_Phi only (equal to the init)
=====================  ==========================================================================

Parameters (``default_params``; [INF] = not stated by the paper, the spec's recommendation or ours). The
``preset`` ("cpu" default, "paper" = the spec's GPU scale, or None) fills the network and loop sizes that
are not given explicitly (:data:`PRESETS`).

Frame: ``rank`` r (even; None -> ``energy`` rule or the even integer nearest d/10 [INF]); ``energy``
(cumulative-energy threshold for r, e.g. 0.9); ``ridge`` lambda = 1e-6 [INF]; ``eps`` = 1e-8 [INF] (polar
radius, block weights, D_V, L_Phi weights); ``mixing`` "haar" [INF Q1] | "learned" | "identity";
``mixing_steps`` 200, ``mixing_lr`` 0.01 (learned R only).

Stage I: ``partners`` p = 4 [INF]; ``tau`` = 0.1 [INF]; ``sigma_min`` 0.01, ``sigma_max`` 1.0 [INF]
(sigma_t = sigma_min^{1-t} sigma_max^t, t ~ U(0,1)); ``wrap_terms`` 3 [INF]; ``score_hidden``,
``score_layers``, ``score_fourier`` 8; ``stage1_steps`` (maximum), ``stage1_lr``, ``stage1_batch_size``,
``stage1_eval_every``, ``stage1_patience`` (evaluations without a relative improvement of ``min_delta``;
None = fixed length), ``stage1_lr_decays`` (x0.3 decays on a plateau before stopping).

Stage II-a: ``radial_map`` "quantile" | "identity" (T_k = id); ``radial_knots`` 4096 [INF Q8];
``v_scaling`` "std_ratio" | "identity" (D = I); ``v_floor`` 0.1 [INF] (text variances floored at this
fraction of their mean over V); ``shrinkage`` gamma or [gamma_U, gamma_V] [INF] (1 = the paper's map,
0 = the global map; used with ``select="none"``); ``global_scale`` "common" (ReAlign's one trace scale) |
"per_side".

Stage II-b: ``refiner_hidden``, ``refiner_layers`` [INF]; ``refine_v`` (the Delta v head; no loss trains it);
``bounds`` "data" (kappa E||c0|| = ``bound_scale`` x the median text ``bound_k``-NN distance [INF]) | "fixed"
(``alpha_theta`` 0.2, ``alpha_rho`` 0.1, ``alpha_v`` 0.002 [INF]; with "data" only the alpha_rho / alpha_theta
ratio and alpha_v are used); ``reproject_v`` True [INF]; ``lambda_phi`` 1.0 [INF Q4];
``phase_normalization`` "sum" [INF] | "paper"; ``identity_weight`` 1e-3 [INF Q3]; ``prior_gradient`` "full"
[INF Q5] | "sds"; ``prior_loss`` "dsm" (L_II) | "guidance" (L_G [INF]); ``ablation_reading`` "guidance" |
"objectives"; ``stage2_steps`` (None -> ``stage2_epochs`` x sample / batch, at least ``stage2_min_steps``),
``stage2_lr``, ``stage2_max_samples`` (texts g_eta trains on).

Selection (``select`` "auto" | "none"): ``select_shrinkage`` (gammas or [gamma_U, gamma_V] pairs),
``select_lambda_phi``, ``select_bound_scale``, ``select_refine_top``, ``select_size``, ``select_k``,
``select_tolerance`` 0.01, ``select_calibration_rows``, ``select_pool`` (see :mod:`.select`).

Loops: ``batch_size``; ``weight_decay`` 0.0 (AdamW); ``max_train_samples`` 200000 (per modality; the spec
wants >= 2e5 texts for Stage II); ``early_stop_patience`` None (Stage II and learned R); ``eval_every`` 100;
``log_every`` 25; ``val_size`` 2048. ``transform_block`` 1024 rows; ``threads`` 1: torch intra-op threads
while fitting and transforming (None = leave the caller's setting).

History (``history.json``): ``stage1_L_I`` (window means), ``stage1_L_I_val`` / ``_val_step`` (held-out
images), ``stage1_lr_decay_steps``, ``stage2*_objective`` and per-term curves (``stage2_lambda<value>_*`` for
each refiner trained by the selection), ``selection`` (the candidates' table) and ``selection_reference``
(ReAlign on the same rows), ``*_steps_run`` and wall times ``seconds_*`` (the final calibration pass is not
included).

Tensors in the artifact: ``mu_text``, ``mu_image``, ``mu_hat`` (d,); ``frame.*`` (eigenvalues, q_u, q_v,
mixing, basis); ``prior.*`` (anchor, weights, strength, offset, edges); ``init.*`` (d_v, shrinkage
[gamma_U, gamma_V], scales [s_U, s_V], levels, text_knots, image_knots); ``refine.bounds`` (alpha_theta,
alpha_rho, alpha_v); ``score_net.*`` and ``refiner.*`` (float32 network weights). Artifacts written before
shrinkage existed lack ``init.shrinkage`` / ``init.scales`` / ``refine.bounds`` and load as the paper's map.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ...embeddings import l2_normalize
from ..base import Aligner, FitContext, _to_device32, register_aligner
from ..realign import ReAlignAligner
from .frame import MIXINGS, Frame, eigen_frame, haar_orthogonal, learn_mixing
from .init import (GLOBAL_SCALES, RADIAL_MAPS, V_SCALINGS, GlobalInit, RadialMap, fit_radial_map, mean_coord_norm,
                   side_scales, v_side_scaling)
from .polar import from_polar, to_polar
from .prior import DiffusionConfig, PhasePrior, ScoreNet, build_score_net, phase_statistics, train_score_net
from .refine import (PHASE_NORMALIZATIONS, Bounds, Refiner, Stage2Objective, bounded_update, build_refiner,
                     kappa_bounds, refiner_features, train_refiner)
from ...geometry.knn import knn_search
from .select import (Candidate, SelectionSet, candidate_row, choose, format_table, median_knn_distance,
                     shrinkage_pair)
from .training import LoopConfig, check_device, reservoir_sample, torch_threads

#: compute scale of the networks and loops; explicit parameters override the preset's values
PRESETS: dict[str, dict[str, Any]] = {
    # converges on a 2-core CPU in minutes (docs/ANISOALIGN.md shows the held-out L_I curve)
    "cpu": {"score_hidden": 256, "score_layers": 3, "stage1_steps": 8000, "stage1_lr": 1e-3, "stage1_batch_size": 256,
            "stage1_patience": 3, "stage1_eval_every": 200, "stage1_lr_decays": 2, "refiner_hidden": 256,
            "refiner_layers": 2, "stage2_lr": 1e-3, "stage2_epochs": 1.0, "stage2_min_steps": 200,
            "stage2_max_samples": 65536, "batch_size": 512},
    # the spec's GPU recommendation (§2.11): 4 x 1024 score net, ~50k steps, lr 1e-4, batch 4096, 2 x 2048 g_eta
    "paper": {"score_hidden": 1024, "score_layers": 4, "stage1_steps": 50_000, "stage1_lr": 1e-4,
              "stage1_batch_size": 4096, "stage1_patience": 10, "stage1_eval_every": 1000, "stage1_lr_decays": 2,
              "refiner_hidden": 2048,
              "refiner_layers": 2, "stage2_lr": 1e-4, "stage2_epochs": 2.0, "stage2_min_steps": 500,
              "stage2_max_samples": None, "batch_size": 4096},
}

DEFAULT_PARAMS: dict[str, Any] = {
    "preset": "cpu",
    # frame
    "rank": None, "energy": None, "ridge": 1e-6, "eps": 1e-8,
    "mixing": "haar", "mixing_steps": 200, "mixing_lr": 1e-2,
    # network sizes and loop lengths: the cpu preset (Stage I and II, batch size)
    **PRESETS["cpu"],
    # Stage I
    "partners": 4, "tau": 0.1, "sigma_min": 0.01, "sigma_max": 1.0, "wrap_terms": 3, "score_fourier": 8,
    # Stage II-a
    "radial_map": "quantile", "radial_knots": 4096, "v_scaling": "std_ratio", "v_floor": 0.1, "shrinkage": 1.0,
    "global_scale": "common",
    # Stage II-b
    "refine_v": False,
    "bounds": "data", "bound_scale": 0.25, "bound_k": 20,
    "alpha_theta": 0.2, "alpha_rho": 0.1, "alpha_v": 0.002, "reproject_v": True,
    "lambda_phi": 1.0, "phase_normalization": "sum", "identity_weight": 1e-3, "prior_gradient": "full",
    "prior_loss": "dsm", "ablation_reading": "guidance",
    "stage2_steps": None,
    # automatic selection (unpaired, held-out fit data)
    "select": "auto",
    "select_shrinkage": [0.0, 0.06, 0.12, 0.25, 0.5, 1.0,
                         [0.0, 0.06], [0.0, 0.12], [0.0, 0.18], [0.0, 0.25], [0.0, 0.35], [0.0, 0.5]],
    "select_lambda_phi": [1.0, 10.0], "select_bound_scale": [0.01, 0.02, 0.05], "select_size": 2048, "select_k": 20,
    "select_tolerance": 0.01, "select_calibration_rows": 16384, "select_pool": 8192, "select_refine_top": 2,
    # loops
    "weight_decay": 0.0, "max_train_samples": 200_000, "early_stop_patience": None,
    "min_delta": 1e-3, "eval_every": 100, "log_every": 25, "val_size": 2048,
    # execution
    "transform_block": 1024, "threads": 1,
}

#: the paper's method exactly as the spec reads it (gamma = 1, eq.-9 L_Phi, fixed bounds, no floor, no selection)
PAPER_SETTINGS: dict[str, Any] = {
    "select": "none", "shrinkage": 1.0, "v_floor": 0.0, "bounds": "fixed", "phase_normalization": "paper",
    "refine_v": True,
}

#: values of parameters added after the first artifacts were written: what those artifacts were fitted with
LEGACY_PARAMS: dict[str, Any] = {
    **PAPER_SETTINGS, "preset": None, "stage1_patience": None, "stage1_eval_every": 100, "stage1_lr_decays": 0,
    "stage2_max_samples": None,
    "prior_loss": "dsm",
    "ablation_reading": "objectives",
}


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"anisoalign: {name} must be one of {list(options)}, got {value!r}")


@dataclass
class _FitSamples:
    """The statistic-estimation samples, split into training rows and held-out selection rows."""

    image_u: np.ndarray  # (n_i, r) unmixed U coordinates of the training images
    text: np.ndarray  # (n_t, d) training texts, float32
    select_image: np.ndarray  # (s, d) held-out images, float64
    select_text: np.ndarray  # (s, d) held-out texts, float64


@register_aligner
class AnisoAlign(Aligner):
    """AnisoAlign with the unpaired ``auto`` selection of gamma, lambda_Phi and the bounds. See the module docstring."""

    name = "anisoalign"
    default_params = DEFAULT_PARAMS
    centroid_calibration = True
    #: train the Stage-I score network
    uses_score_net: ClassVar[bool] = True
    #: Stage-II objective terms; empty = no refiner at all (global init only). "prior" reads ``prior_loss``.
    stage2_losses: ClassVar[tuple[str, ...]] = ("prior", "phase")

    def __init__(self, **params: Any) -> None:
        preset = params.get("preset", self.default_params.get("preset"))
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"{self.name}: preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
            params = {**{k: v for k, v in PRESETS[preset].items() if k in self.default_params}, **params}
        super().__init__(**params)
        self.frame: Frame | None = None
        self.prior: PhasePrior | None = None
        self.init: GlobalInit | None = None
        self.score_net: ScoreNet | None = None
        self.refiner: Refiner | None = None
        self.bounds: Bounds | None = None

    @classmethod
    def from_config_params(cls, params: dict[str, Any]) -> "AnisoAlign":
        """Artifacts written before a parameter existed were fitted with its legacy value, not today's default."""
        return cls(**{**{k: v for k, v in LEGACY_PARAMS.items() if k not in params}, **params})

    # ----------------------------------------------------------------------------- fitting
    def _validate_params(self) -> None:
        p = self.params
        _choice("mixing", p["mixing"], MIXINGS)
        _choice("radial_map", p["radial_map"], RADIAL_MAPS)
        _choice("v_scaling", p["v_scaling"], V_SCALINGS)
        _choice("prior_gradient", p["prior_gradient"], ("full", "sds"))
        _choice("prior_loss", p["prior_loss"], ("dsm", "guidance"))
        _choice("ablation_reading", p["ablation_reading"], ("guidance", "objectives"))
        _choice("phase_normalization", p["phase_normalization"], PHASE_NORMALIZATIONS)
        _choice("bounds", p["bounds"], ("data", "fixed"))
        _choice("select", p["select"], ("auto", "none"))
        _choice("global_scale", p["global_scale"], GLOBAL_SCALES)
        for key in ("alpha_theta", "alpha_rho", "alpha_v", "bound_scale", "v_floor", "select_tolerance"):
            if not float(p[key]) >= 0:
                raise ValueError(f"anisoalign: {key} must be >= 0, got {p[key]}")
        for value in [p["shrinkage"], *p["select_shrinkage"]]:
            shrinkage_pair(value)
        if p["select"] == "auto" and not p["select_shrinkage"]:
            raise ValueError("anisoalign: select='auto' needs at least one select_shrinkage value")
        if not 0 < float(p["sigma_min"]) <= float(p["sigma_max"]):
            raise ValueError(f"anisoalign: need 0 < sigma_min <= sigma_max, got {p['sigma_min']}, {p['sigma_max']}")
        if int(p["max_train_samples"]) < 2:
            raise ValueError(f"anisoalign: max_train_samples must be >= 2, got {p['max_train_samples']}")

    def _loop(self, ctx: FitContext, *, steps: int, lr: float, seed: int, **changes) -> LoopConfig:
        p = self.params
        loop = LoopConfig(steps=int(steps), batch_size=int(p["batch_size"]), lr=float(lr),
                          weight_decay=float(p["weight_decay"]), device=ctx.device, seed=int(seed),
                          log_every=int(p["log_every"]), eval_every=int(p["eval_every"]),
                          patience=None if p["early_stop_patience"] is None else int(p["early_stop_patience"]),
                          min_delta=float(p["min_delta"]), val_size=int(p["val_size"]), progress=ctx.progress,
                          threads=p["threads"])
        return loop.derive(**changes) if changes else loop

    def _check_fit_options(self, *, device: str, reducer) -> None:
        check_device(device)

    def _fit(self, ctx: FitContext) -> None:
        with torch_threads(self.params["threads"]):
            self._fit_stages(ctx)

    def _fit_stages(self, ctx: FitContext) -> None:
        """Spec §2.10, step by step (each step is a method below)."""
        if ctx.reducer is not None:
            raise ValueError(
                f"{self.name}: fitting across processes (reducer) is not supported, because Stage I/II train "
                "networks on one process's sample; fit once in a single process and share the artifact"
            )
        self._validate_params()
        clock = time.perf_counter()
        frame = eigen_frame(ctx.text_moments, ctx.image_moments, ridge=float(self.params["ridge"]),
                            rank=self.params["rank"], energy=self.params["energy"])
        samples = self._draw_samples(ctx, frame)
        frame.mixing = self._fit_mixing(ctx, frame, samples.image_u)
        rho_x, theta_x = to_polar(samples.image_u @ frame.mixing, float(self.params["eps"]))
        self._fit_statistics(ctx, frame, samples, rho_x, theta_x)
        clock = self._lap("seconds_frame_stats_init", clock)
        if self.uses_score_net:
            self._fit_score_net(ctx, samples, rho_x, theta_x)
            clock = self._lap("seconds_stage1", clock)
        if self.params["select"] == "auto":
            self._select(ctx, samples)
            clock = self._lap("seconds_selection", clock)
        elif self.stage2_losses:
            self._fit_fixed_refinement(ctx, samples)
            self._lap("seconds_stage2", clock)
        self._build_runtime()

    def _draw_samples(self, ctx: FitContext, frame: Frame) -> _FitSamples:
        """Reservoir samples of images (as U coordinates) and texts; the last rows are held out for selection."""
        p, seed = self.params, self.seed
        cap = int(p["max_train_samples"])
        q_u = frame.q_u
        n_select = int(p["select_size"])
        # both samples are kept as float32 (n, d) (memory), every product with them is taken in float64
        image = reservoir_sample(ctx.image_chunks(), cap + n_select, seed, dtype=np.float32)
        text = reservoir_sample(ctx.text_chunks(), cap + n_select, seed + 1, dtype=np.float32)
        held = min(n_select, image.shape[0] // 4, text.shape[0] // 4)
        n_i, n_t = min(cap, image.shape[0] - held), min(cap, text.shape[0] - held)
        self.fit_counts.update({"image_sample": int(n_i), "text_sample": int(n_t), "select_sample": int(held)})
        return _FitSamples(image_u=self._blockwise(image[:n_i], lambda rows: rows @ q_u), text=text[:n_t],
                           select_image=image[image.shape[0] - held:].astype(np.float64),
                           select_text=text[text.shape[0] - held:].astype(np.float64))

    def _fit_mixing(self, ctx: FitContext, frame: Frame, image_u: np.ndarray) -> np.ndarray:
        """The orthogonal mixing R (spec Q1)."""
        p = self.params
        if p["mixing"] == "identity":
            return np.eye(frame.rank)
        mixing = haar_orthogonal(frame.rank, self.seed)
        if p["mixing"] == "learned":
            mixing, hist = learn_mixing(image_u, mixing, eps=float(p["eps"]),
                                        loop=self._loop(ctx, steps=p["mixing_steps"], lr=p["mixing_lr"],
                                                        seed=self.seed + 3))
            self._add_history(hist, "mixing")
        return mixing

    def _fit_statistics(self, ctx: FitContext, frame: Frame, samples: _FitSamples, rho_x, theta_x) -> None:
        """Stage I statistics (image phases), Stage II-a maps (radial T_k, D_V with its floor, side scales)."""
        p, eps = self.params, float(self.params["eps"])
        mu_t, mu_i = ctx.text_moments.mean, ctx.image_moments.mean
        prior = phase_statistics(rho_x, theta_x, partners=int(p["partners"]), eps=eps)
        basis = frame.basis
        rho_y, _ = to_polar(self._blockwise(samples.text, lambda rows: (rows - mu_t + mu_i) @ basis), eps)
        radial = fit_radial_map(rho_y, rho_x, int(p["radial_knots"])) if p["radial_map"] == "quantile" else None
        if p["v_scaling"] == "std_ratio":
            d_v = v_side_scaling(ctx.text_moments, ctx.image_moments, frame.q_v, eps, float(p["v_floor"]))
        else:
            d_v = np.ones(frame.q_v.shape[1])
        scale_u, scale_v = side_scales(ctx.text_moments, ctx.image_moments, basis, frame.q_v, eps, p["global_scale"])
        gamma_u, gamma_v = shrinkage_pair(p["shrinkage"])
        init = GlobalInit(mu_t, mu_i, frame, radial, d_v, eps, gamma_u, scale_u, scale_v, gamma_v)
        self.tensors.update({"mu_text": mu_t, "mu_image": mu_i, **frame.tensors(), **prior.tensors(), **init.tensors()})
        self._build_runtime()

    def _fit_score_net(self, ctx: FitContext, samples: _FitSamples, rho_x, theta_x) -> None:
        """Stage I: the score network on the training images, stopped on a plateau of held-out L_I."""
        p = self.params
        rho_val = theta_val = None
        if samples.select_image.shape[0]:
            rho_val, theta_val = to_polar(samples.select_image @ self.frame.basis, float(p["eps"]))
        net = self._new_score_net(self.frame.blocks, self.seed + 4)
        patience = p["stage1_patience"]
        loop = self._loop(ctx, steps=p["stage1_steps"], lr=p["stage1_lr"], seed=self.seed + 5,
                          batch_size=int(p["stage1_batch_size"] or p["batch_size"]),
                          eval_every=int(p["stage1_eval_every"]), patience=None if patience is None else int(patience),
                          lr_decays=int(p["stage1_lr_decays"]))
        hist = train_score_net(net, theta_x, rho_x, self.prior, diffusion=self._diffusion(), loop=loop,
                               val_theta=theta_val, val_rho=rho_val)
        self._add_history(hist, "stage1")
        self.tensors.update(_state_tensors("score_net.", net))
        self.score_net = self._load_module(self._new_score_net(self.frame.blocks, 0), "score_net.")

    def _fit_fixed_refinement(self, ctx: FitContext, samples: _FitSamples) -> None:
        """Stage II-b with the given gamma, lambda_Phi and bounds (no selection)."""
        p = self.params
        bounds = self._fixed_bounds()
        if p["bounds"] == "data":
            bounds = self._data_bounds(self.init, float(p["bound_scale"]), samples)
        refiner = self._train_stage2(ctx, samples.text, self.init, float(p["lambda_phi"]), bounds)
        self.tensors["refine.bounds"] = _bounds_tensor(bounds)
        self.tensors.update(_state_tensors("refiner.", refiner))

    def _train_stage2(self, ctx: FitContext, text: np.ndarray, init: GlobalInit, lambda_phi: float,
                      bounds: Bounds, tag: str = "stage2") -> Refiner:
        """Train g_eta on the initial states of ``text`` under ``init``; s_phi stays frozen."""
        p = self.params
        if p["stage2_max_samples"] is not None:
            text = text[: int(p["stage2_max_samples"])]
        theta0, rho0, v0 = self._blockwise(text, init.state, outputs=3, dtype=np.float32)
        refiner = self._new_refiner(self.frame.blocks, self.seed + 6)
        n = theta0.shape[0]
        steps = p["stage2_steps"]
        if steps is None:
            steps = max(int(p["stage2_min_steps"]),
                        math.ceil(float(p["stage2_epochs"]) * n / min(int(p["batch_size"]), n)))
        objective = Stage2Objective(self._stage2_terms(), lambda_phi, float(p["identity_weight"]), p["prior_gradient"],
                                    p["phase_normalization"])
        hist = train_refiner(refiner, theta0, rho0, v0, basis=self.frame.basis, prior=self.prior,
                             score_net=self.score_net, objective=objective, bounds=bounds,
                             diffusion=self._diffusion(), eps=float(p["eps"]),
                             loop=self._loop(ctx, steps=steps, lr=p["stage2_lr"], seed=self.seed + 7))
        self._add_history({key.replace("stage2", tag, 1): value for key, value in hist.items()}, tag)
        return refiner

    # -------------------------------------------------------------------------- selection
    def _select(self, ctx: FitContext, samples: _FitSamples) -> None:
        """``select="auto"``: score every candidate on held-out fit data and keep the chosen one (select.py)."""
        p = self.params
        if samples.select_text.shape[0] < int(p["select_k"]) + 2:
            raise ValueError(f"{self.name}: select='auto' needs more than {int(p['select_k']) + 1} held-out rows; "
                             f"the fit has {samples.select_text.shape[0]} (give more data, or select='none')")
        # mu_hat of every candidate (and of the reference) from the same rows: the whole text sample when it is
        # small enough, so that the selection sees the calibration that the final fit will compute. The first
        # calibration rows (training texts, never the held-out ones) also form Omega_k's neighbour pool.
        calib = np.concatenate([samples.text, samples.select_text])[: int(p["select_calibration_rows"])]
        calib = calib.astype(np.float64)
        n_pool = max(0, min(int(p["select_pool"]) - samples.select_text.shape[0], samples.text.shape[0], len(calib)))
        sel = SelectionSet(samples.select_text, samples.select_image, k=int(p["select_k"]), seed=self.seed,
                           pool=calib[:n_pool])
        reference = sel.score(*self._realign_substitutes(ctx, sel.text, calib, n_pool))
        inits = {pair: self._init_with(pair) for pair in dict.fromkeys(map(shrinkage_pair, p["select_shrinkage"]))}
        rows, chosen = [], []

        states: dict[tuple, tuple] = {}  # initial states of the refinement bases, computed once

        def evaluate(candidate: Candidate, refiner: Refiner | None, bounds: Bounds | None) -> None:
            z, z_calib = self._substitutes(sel.text, calib, inits[candidate.shrinkage], refiner, bounds,
                                           states.get(candidate.shrinkage))
            rows.append(candidate_row(candidate, sel.score(z, z_calib[:n_pool])))
            chosen.append((candidate, refiner, bounds))

        for gamma in inits:
            evaluate(Candidate(gamma), None, None)
        tolerance = float(p["select_tolerance"])
        gamma_star = tuple(rows[choose(rows, reference, tolerance)]["shrinkage"])
        if self.stage2_losses and p["select_bound_scale"]:
            median_knn = sel.median_knn_distance()
            bases = _refinement_bases(rows, gamma_star, int(p["select_refine_top"]))
            for gamma in bases:
                states[gamma] = tuple(
                    self._blockwise(part, inits[gamma].state, outputs=3) for part in (sel.text, calib)
                )
            for lam in p["select_lambda_phi"]:
                top = self._data_bounds(inits[gamma_star], max(p["select_bound_scale"]), samples, median_knn)
                refiner = self._train_stage2(ctx, samples.text, inits[gamma_star], float(lam), top,
                                             tag=f"stage2_lambda{float(lam):g}")
                for gamma in bases:
                    coord_norm = mean_coord_norm(states[gamma][1][1], self.init.eps)  # E||c0|| on the calib rows
                    for beta in p["select_bound_scale"]:
                        bounds = self._data_bounds(inits[gamma], float(beta), samples, median_knn, coord_norm)
                        evaluate(Candidate(gamma, float(lam), float(beta)), refiner, bounds)
        best = choose(rows, reference, tolerance)
        self._keep_candidate(*chosen[best], inits)
        self.history["selection"] = rows
        self.history["selection_reference"] = reference
        if ctx.progress:
            print(format_table(rows, reference), flush=True)

    def _keep_candidate(self, candidate: Candidate, refiner: Refiner | None, bounds: Bounds | None,
                        inits: dict[tuple, GlobalInit]) -> None:
        self.tensors.update(inits[candidate.shrinkage].tensors())
        for key in [k for k in self.tensors if k.startswith("refiner.") or k == "refine.bounds"]:
            del self.tensors[key]
        if candidate.refined:
            self.tensors["refine.bounds"] = _bounds_tensor(bounds)
            self.tensors.update(_state_tensors("refiner.", refiner))

    def _realign_substitutes(self, ctx: FitContext, text: np.ndarray, calib: np.ndarray, n_pool: int):
        """ReAlign fitted on the same fit data, applied to ``text``: the selection's semantic reference.

        Its centroid calibration uses the same ``calib`` rows as the candidates', so every row of the
        selection table carries the same estimation error of mu_hat.
        """
        reference = ReAlignAligner()
        reference.dim = self.dim
        reference._fit(ctx)
        z, z_calib = _calibrated(reference._map(text), reference._map(calib), ctx.image_moments.mean)
        return z, z_calib[:n_pool]

    def _init_with(self, shrinkage: tuple[float, float]) -> GlobalInit:
        base = self.init
        return GlobalInit(base.mu_text, base.mu_image, base.frame, base.radial, base.d_v, base.eps, shrinkage[0],
                          base.scale_u, base.scale_v, shrinkage[1])

    def _substitutes(self, text, calib, init: GlobalInit, refiner: Refiner | None, bounds: Bounds | None,
                     states: tuple | None = None) -> np.ndarray:
        """Calibrated substitutes of ``text`` and ``calib`` under one candidate; mu_hat estimated on ``calib``.

        ``states`` may hold the precomputed initial states of (``text``, ``calib``) under ``init``."""
        if states is not None:
            mapped = [self._refine_states(*state, refiner, bounds)[-1] for state in states]
            return _calibrated(mapped[0], mapped[1], init.mu_image)
        block = lambda rows: self._map_block(rows, init, refiner, bounds)[-1]  # noqa: E731
        return _calibrated(self._blockwise(text, block), self._blockwise(calib, block), init.mu_image)

    def _fixed_bounds(self) -> Bounds:
        p = self.params
        return Bounds(float(p["alpha_theta"]), float(p["alpha_rho"]), float(p["alpha_v"]), bool(p["reproject_v"]))

    def _data_bounds(self, init: GlobalInit, scale: float, samples: _FitSamples, median_knn: float | None = None,
                     coord_norm: float | None = None) -> Bounds:
        """Bounds with kappa E||c0|| = ``scale`` x the median text k-NN distance [INF].

        alpha_rho / alpha_theta keeps the ratio of the ``alpha_*`` parameters; alpha_v is kept as given.
        ``median_knn`` and ``coord_norm`` (E||c0|| under ``init``) are computed here when not given.
        """
        p = self.params
        if median_knn is None:
            held = samples.select_text if samples.select_text.shape[0] > int(p["bound_k"]) else samples.text[:4096]
            held = np.asarray(held, dtype=np.float64)
            median_knn = median_knn_distance(held, knn_search(held, k=int(p["bound_k"])))
        if coord_norm is None:
            rows = np.asarray(samples.text[: int(p["select_calibration_rows"])], dtype=np.float64)
            coord_norm = float(init.mean_coord_norm(rows))
        ratio = float(p["alpha_rho"]) / float(p["alpha_theta"]) if float(p["alpha_theta"]) > 0 else 0.5
        target = float(scale) * median_knn / max(coord_norm, 1e-12)
        kb = kappa_bounds(target, rho_ratio=ratio, alpha_v=float(p["alpha_v"]))
        return Bounds(kb.alpha_theta, kb.alpha_rho, kb.alpha_v, bool(p["reproject_v"]))

    # -------------------------------------------------------------------------- components
    def _stage2_terms(self) -> tuple[str, ...]:
        prior_term = "guidance" if self.params["prior_loss"] == "guidance" else "prior"
        return tuple(prior_term if term == "prior" else term for term in self.stage2_losses)

    def _lap(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.history[key] = [now - since]
        return now

    def _add_history(self, hist: dict, stage: str) -> None:
        for key, values in hist.items():
            name = f"{stage}{key}" if key.startswith("_") else key  # _steps_run -> stage1_steps_run
            self.history[name] = [float(v) for v in values]

    def _diffusion(self) -> DiffusionConfig:
        p = self.params
        return DiffusionConfig(tau=float(p["tau"]), sigma_min=float(p["sigma_min"]), sigma_max=float(p["sigma_max"]),
                               n_terms=int(p["wrap_terms"]))

    def _new_score_net(self, blocks: int, seed: int) -> ScoreNet:
        p = self.params
        return build_score_net(blocks, hidden=int(p["score_hidden"]), layers=int(p["score_layers"]),
                               fourier=int(p["score_fourier"]), sigma_min=float(p["sigma_min"]),
                               sigma_max=float(p["sigma_max"]), seed=seed)

    def _new_refiner(self, blocks: int, seed: int, with_v: bool | None = None) -> Refiner:
        p = self.params
        with_v = bool(p["refine_v"]) if with_v is None else with_v
        return build_refiner(blocks, self.dim, hidden=int(p["refiner_hidden"]), layers=int(p["refiner_layers"]),
                             seed=seed, with_v=with_v)

    def _load_module(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        state = {key[len(prefix):]: torch.from_numpy(np.array(value)) for key, value in self.tensors.items()
                 if key.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        return module.eval().requires_grad_(False)

    def _build_runtime(self) -> None:
        """(Re)build frame, prior, global init, networks and bounds from ``self.tensors`` (fit and load share this).

        Artifacts written before shrinkage and data-scaled bounds existed have no ``init.shrinkage`` /
        ``refine.bounds``: they are the paper's map (gamma = 1) with the ``alpha_*`` parameters.
        """
        t = self.tensors
        eps = float(self.params["eps"])
        self.frame = Frame.from_tensors(t)
        self.prior = PhasePrior.from_tensors(t)
        gammas = t["init.shrinkage"] if "init.shrinkage" in t else np.ones(2)
        scales = t["init.scales"] if "init.scales" in t else np.ones(2)
        self.init = GlobalInit(t["mu_text"], t["mu_image"], self.frame, RadialMap.from_tensors(t), t["init.d_v"], eps,
                               float(gammas[0]), float(scales[0]), float(scales[1]), float(gammas[-1]))
        blocks = self.frame.blocks
        self.score_net = self._load_module(self._new_score_net(blocks, 0), "score_net.") if any(
            k.startswith("score_net.") for k in t) else None
        self.refiner = None
        if "refiner.head.weight" in t:
            with_v = t["refiner.head.weight"].shape[0] > 2 * blocks
            self.refiner = self._load_module(self._new_refiner(blocks, 0, with_v), "refiner.")
        self.bounds = Bounds(*(float(a) for a in t["refine.bounds"][:3]), bool(self.params["reproject_v"])) \
            if "refine.bounds" in t else self._fixed_bounds()
        self._basis = np.ascontiguousarray(t["frame.basis"])
        self._basis64 = torch.from_numpy(self._basis)

    def _load_state(self, config, tensors, history) -> None:
        super()._load_state(config, tensors, history)
        self._build_runtime()

    def selection_table(self) -> str:
        """The ``auto`` candidates' table of the last fit (or of the loaded artifact); '' without selection."""
        rows = self.history.get("selection")
        return format_table(rows, self.history.get("selection_reference")) if rows else ""

    # ----------------------------------------------------------------------------- mapping
    def _blockwise(self, rows: np.ndarray, fn, outputs: int = 1, dtype=np.float64):
        """Apply ``fn`` to fixed-shape, zero-padded blocks of ``transform_block`` rows and concatenate.

        Every call of ``fn`` sees exactly (transform_block, d) float64 input, so results are row-wise
        bit-stable (BLAS kernels are chosen by shape). Outputs are stored as ``dtype``.
        """
        block = int(self.params["transform_block"])
        parts: list[list[np.ndarray]] = [[] for _ in range(outputs)]
        for start in range(0, rows.shape[0], block):
            chunk = np.asarray(rows[start : start + block], dtype=np.float64)
            n = chunk.shape[0]
            if n < block:
                chunk = np.concatenate([chunk, np.zeros((block - n, chunk.shape[1]))])
            out = fn(chunk)
            out = out if outputs > 1 else (out,)
            for i in range(outputs):
                parts[i].append(np.asarray(out[i][:n], dtype=dtype))
        if not parts[0]:
            raise ValueError("no rows")
        cat = tuple(np.concatenate(p) for p in parts)
        return cat if outputs > 1 else cat[0]

    def refined_state(self, text: np.ndarray) -> dict[str, np.ndarray]:
        """All intermediate quantities for validated texts (n, d) float64, in fixed-shape blocks.

        Returns float64 arrays: ``theta0``, ``rho0`` (n, m), ``v0`` (n, d) (global init), ``theta_hat``,
        ``rho_hat`` (n, m), ``v_hat`` (n, d) (after the bounded update; equal to the init without a
        refiner) and ``mapped`` (n, d) = B c_hat + v_hat, the uncalibrated e' before normalisation.
        """
        keys = ("theta0", "rho0", "v0", "theta_hat", "rho_hat", "v_hat", "mapped")
        with torch_threads(self.params["threads"]):
            arrays = self._blockwise(np.asarray(text, dtype=np.float64), self._map_block, outputs=len(keys))
        return dict(zip(keys, arrays))

    def _map_block(self, block: np.ndarray, init: GlobalInit | None = None, refiner: Refiner | None = None,
                   bounds: Bounds | None = None):
        """One fixed-shape block through init -> g_eta -> bounded update -> e' (the fitted state by default)."""
        if init is None:
            init, refiner, bounds = self.init, self.refiner, self.bounds
        theta0, rho0, v0 = init.state(block)
        return (theta0, rho0, v0, *self._refine_states(theta0, rho0, v0, refiner, bounds))

    def _refine_states(self, theta0, rho0, v0, refiner: Refiner | None, bounds: Bounds | None):
        """Initial states -> (theta_hat, rho_hat, v_hat, e' = B c_hat + v_hat) through g_eta and eq. 7."""
        if refiner is not None:
            state = [torch.from_numpy(a) for a in (theta0, rho0, v0)]
            with torch.no_grad():
                feats = refiner_features(*(s.to(torch.float32) for s in state))
                deltas = [None if d is None else d.to(torch.float64) for d in refiner(feats)]
                theta_hat, rho_hat, v_hat, _ = bounded_update(*state, *deltas, self._basis64, bounds)
            theta_hat, rho_hat, v_hat = theta_hat.numpy(), rho_hat.numpy(), v_hat.numpy()
        else:
            theta_hat, rho_hat, v_hat = theta0, rho0, v0
        mapped = from_polar(rho_hat, theta_hat, float(self.params["eps"])) @ self._basis.T + v_hat
        return theta_hat, rho_hat, v_hat, mapped

    def _map(self, text: np.ndarray) -> np.ndarray:
        with torch_threads(self.params["threads"]):
            return self._blockwise(text, lambda block: self._map_block(block)[-1])

    # ------------------------------------------------------------------- mapping on a device
    def _default_device_block(self) -> int:
        return int(self.params["transform_block"])

    def _device_tensors(self, device) -> dict:
        """The fitted map as float32 device tensors, laid out for :meth:`_map_torch` (products formed in float64).

        The U coordinates are kept *block-major*: with the basis permuted to B_p = [B[:, 0::2] | B[:, 1::2]],
        c_p = B_p^T y_bar holds every block's a_k in its first m columns and b_k in its last m, so the polar
        code works on two contiguous halves (no stack / reshape) and B_p^T maps them back.
        """
        return _device_state(self, device)

    def _map_torch(self, text: torch.Tensor, tensors: dict) -> torch.Tensor:
        """Float32 mirror of :meth:`_map_block`: global init -> g_eta -> bounded update -> e' = B c_hat + v_hat.

        Phases enter only through cos / sin, so they are carried as (cos theta, sin theta) = (a, b) / |c|
        (atan2 of the reference, then cos / sin of it, in exact arithmetic) and the bounded phase step is
        applied by the angle-addition formulas; the wrap of eq. 7 leaves cos / sin unchanged.
        """
        return _map_device(tensors, text)


def _refinement_bases(rows: list[dict], gamma_star: tuple, top: int) -> list[tuple]:
    """The closed-form candidates the refiner is tried on: gamma* and, below it on both sides, the feasible
    ones with the next-largest M_k^X (at most ``top`` in all). Refinement spends semantics too, so it is only
    paired with gammas that leave room for it."""
    below = [r for r in rows if r["feasible"] and r["shrinkage"][0] <= gamma_star[0]
             and r["shrinkage"][1] <= gamma_star[1]]
    below.sort(key=lambda r: -r["M_k_X"])
    bases = [gamma_star] + [tuple(r["shrinkage"]) for r in below if tuple(r["shrinkage"]) != gamma_star]
    return bases[: max(1, top)]


def _calibrated(mapped: np.ndarray, mapped_calib: np.ndarray, mu_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Norm(Norm(e') - mu_hat + mu_i) of both inputs, mu_hat the mean of Norm(e') over the calibration rows (§2.9)."""
    calib = l2_normalize(mapped_calib)
    mu_hat = calib.mean(axis=0)
    return l2_normalize(l2_normalize(mapped) - mu_hat + mu_image), l2_normalize(calib - mu_hat + mu_image)


def _bounds_tensor(bounds: Bounds) -> np.ndarray:
    return np.array([bounds.alpha_theta, bounds.alpha_rho, bounds.alpha_v], dtype=np.float64)


def _state_tensors(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {prefix + key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


@register_aligner
class AnisoAlignPaper(AnisoAlign):
    """The paper's method as the spec reads it: gamma = 1, eq.-9 L_Phi, fixed bounds, no D_V floor, no selection."""

    name = "anisoalign-paper"
    default_params = {**DEFAULT_PARAMS, **PAPER_SETTINGS}


@register_aligner
class AnisoAlignInit(AnisoAlignPaper):
    """Table 4 "Global Init only": Stage II-a state, reconstructed and centroid-calibrated; no networks."""

    name = "anisoalign-init"
    uses_score_net = False
    stage2_losses = ()


class _ReadingAblation(AnisoAlignPaper):
    """An ablation whose objective depends on ``ablation_reading`` (docs/ANISOALIGN.md, "Ablations")."""

    readings: ClassVar[dict[str, tuple[str, ...]]] = {}

    def _stage2_terms(self) -> tuple[str, ...]:
        return self.readings[self.params["ablation_reading"]]

    @property
    def uses_score_net(self) -> bool:  # type: ignore[override]
        return any(term in ("prior", "guidance") for term in self._stage2_terms())


@register_aligner
class AnisoAlignRefine(_ReadingAblation):
    """Table 4 "+ Refinement": g_eta trained by L_G ("guidance" reading, default) or by 1e-3 ||tanh||^2 only."""

    name = "anisoalign-refine"
    stage2_losses = ("refine",)
    readings = {"guidance": ("guidance",), "objectives": ("identity",)}


@register_aligner
class AnisoAlignPrior(AnisoAlignPaper):
    """Table 4 "+ Refinement + L_II": g_eta trained by the prior-matching loss only."""

    name = "anisoalign-prior"
    stage2_losses = ("prior",)


@register_aligner
class AnisoAlignPhase(_ReadingAblation):
    """Table 4 "+ Refinement + L_Phi": L_G + lambda_Phi L_Phi ("guidance" reading) or lambda_Phi L_Phi only."""

    name = "anisoalign-phase"
    stage2_losses = ("phase",)
    readings = {"guidance": ("guidance", "phase"), "objectives": ("phase",)}


# ------------------------------------------------------------------------------ device path
#: cells per knot of the radial map's uniform lookup grid on the device (see :func:`_radial_grid`)
RADIAL_GRID_CELLS_PER_KNOT = 4


def _device_state(aligner: AnisoAlign, device) -> dict:
    """float32 tensors (and Python scalars) of :meth:`AnisoAlign._map_torch`; see its docstrings.

    Every product of fitted quantities is formed in float64 here and rounded to float32 once.
    """
    f32 = _to_device32
    init, eps = aligner.init, float(aligner.params["eps"])
    basis = aligner.frame.basis
    r = basis.shape[1]
    basis_p = basis[:, np.r_[0:r:2, 1:r:2]]
    # one projection y -> [c_p | v0 | (refiner's first layer on v0)], with c_p = B_p^T (y - mu_t + mu_i) and
    # v0 = Q_V D Q_V^T y + v_offset (GlobalInit.state); the first layer's v0 columns are folded in
    weights = [basis_p, init._v_matrix]
    biases = [(init.mu_image - init.mu_text) @ basis_p, init._v_offset]
    state: dict[str, Any] = {"m": r // 2, "d": basis.shape[0], "eps": eps}
    if aligner.refiner is not None:
        net = aligner.refiner
        linears = [net.body[i] for i in range(0, len(net.body), 3)] + [net.head]
        as64 = lambda p: p.detach().double().numpy()  # noqa: E731
        # the first layer (the head when there is no hidden layer), on [sin; cos; log rho; v0]
        w1 = as64(linears[0].weight)
        weights.append(init._v_matrix @ w1[:, 3 * (r // 2):].T)
        biases.append(init._v_offset @ w1[:, 3 * (r // 2):].T + as64(linears[0].bias))
        state["first"] = f32(w1[:, : 3 * (r // 2)].T, device)  # (3m, width)
        layers = []  # (linear weight, bias or None for the folded first one, LayerNorm weight, bias, eps)
        for i in range(0, len(net.body), 3):
            linear, norm = net.body[i], net.body[i + 1]
            layers.append((None if i == 0 else f32(as64(linear.weight), device),
                           None if i == 0 else f32(as64(linear.bias), device),
                           f32(as64(norm.weight), device), f32(as64(norm.bias), device), float(norm.eps)))
        state["layers"] = layers
        state["head"] = (f32(as64(net.head.weight), device), f32(as64(net.head.bias), device)) if layers else None
        state["with_v"] = bool(net.with_v)
        b = aligner.bounds
        state["bounds"] = (float(b.alpha_theta), float(b.alpha_rho), float(b.alpha_v), bool(b.reproject_v))
    state["proj"] = f32(np.concatenate(weights, axis=1), device)
    state["proj_bias"] = f32(np.concatenate(biases), device)
    state["basis"] = f32(basis_p, device)
    state["back"] = f32(basis_p.T, device)
    if init.radial is not None:
        state.update(_radial_grid(init.radial.text_knots, init.radial.image_knots, device))
    gamma = float(init.shrinkage)
    if gamma != 1.0:
        u_off = init.mu_image @ basis_p  # B_p^T mu_i
        state["shrink"] = (gamma, (1.0 - gamma) * init.scale_u)
        state["shrink_offset"] = f32((1.0 - gamma) * (1.0 - init.scale_u) * u_off, device)
    return state


def _radial_grid(text_knots: np.ndarray, image_knots: np.ndarray, device) -> dict:
    """The radial map T_k on the device: knots, slopes, and a uniform lookup grid replacing a binary search.

    T_k = (F_k^x)^-1 o F_k^y, both CDFs interpolated at the same levels, is the piecewise-linear map that
    sends text knot j to image knot j: one interpolation, the reference's two composed exactly. Finding a
    radius's segment j (the last knot <= it) by ``torch.searchsorted`` costs ~100 ns per value on a CPU, so
    the segment is found from a uniform grid of G cells over [t_0, t_{K-1}]: ``start[k, c]`` is the segment
    at the left edge of cell c - 1, and at most S knots lie between that edge and the right edge of cell
    c + 1 (the one-cell margins absorb float32 rounding of the cell index). A binary search over the window
    [start, start + 2^s - 1] (2^s > S; ``halves`` = 2^(s-1), ..., 1) then lands on exactly the segment that a
    binary search over all the float32 knots returns: s = log2(S + 1) rounded up gather-and-compare passes.
    """
    f32 = lambda a: _to_device32(a, device)  # noqa: E731
    tk = text_knots.astype(np.float32).astype(np.float64)  # the knots as the device holds them
    blocks, k = tk.shape
    width = np.diff(text_knots, axis=1)
    slope = np.divide(np.diff(image_knots, axis=1), width, out=np.zeros_like(width), where=width > 0)
    cells = RADIAL_GRID_CELLS_PER_KNOT * k
    lo, span = tk[:, 0], tk[:, -1] - tk[:, 0]
    cell_width = np.where(span > 0, span / cells, 1.0)
    edges = lo[:, None] + cell_width[:, None] * np.arange(-1, cells + 2)  # left edges of cells -1 .. G + 1
    seg = np.stack([np.searchsorted(tk[b], edges[b], side="right") - 1 for b in range(blocks)])
    seg = np.clip(seg, 0, k - 2)
    start, end = seg[:, :cells], seg[:, 3:]  # cell c: from the left edge of c - 1 to the right edge of c + 1
    window = 1 << int((end - start).max()).bit_length()  # a power of two > S
    halves = []
    while window > 1:
        window //= 2
        halves.append(window)
    # +inf columns: the window never selects a knot past the last one
    padded = np.concatenate([tk, np.full((blocks, 2 * halves[0] if halves else 1), np.inf)], axis=1)
    return {"knots_text": f32(padded), "knots_image": f32(image_knots), "knots_slope": f32(slope),
            "knots_lo": f32(lo[:, None]), "knots_hi": f32(tk[:, -1:]),
            "knots_inv_width": f32(1.0 / cell_width[:, None]),
            "knots_start": torch.as_tensor(start, dtype=torch.long, device=device).contiguous(), "knots_halves": halves,
            "knots_cells": cells}


def _radial_device(t: dict, rho: torch.Tensor) -> torch.Tensor:
    """T_k(rho) per block with np.interp semantics (clamped to the end knots); rho (n, m) float32."""
    x = rho.T.contiguous()  # (m, n): the knots' rows
    tk, lo, hi = t["knots_text"], t["knots_lo"], t["knots_hi"]
    cell = torch.floor((x - lo) * t["knots_inv_width"]).clamp_(0, t["knots_cells"] - 1).to(torch.long)
    j = torch.gather(t["knots_start"], 1, cell.clamp_(0, t["knots_cells"] - 1))  # second clamp: NaN rows
    for half in t["knots_halves"]:  # the last knot <= x within [start, start + 2^s - 1]
        probe = j + half
        j = torch.where(torch.gather(tk, 1, probe) <= x, probe, j)
    image = t["knots_image"]
    j.clamp_(max=image.shape[1] - 2)  # x >= t_{K-1} steps onto the last knot; the clamp below takes over
    out = torch.gather(image, 1, j) + (x - torch.gather(tk, 1, j)) * torch.gather(t["knots_slope"], 1, j)
    out = torch.where(x < lo, image[:, :1], out)
    out = torch.where(x >= hi, image[:, -1:], out)
    return out.T


def _direction(a: torch.Tensor, b: torch.Tensor, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of atan2(b, a) = (a, b) / |(a, b)|, and (1, 0) where a = b = 0 (as atan2(0, 0) = 0)."""
    inv = 1.0 / torch.sqrt(sq)  # inf where a = b = 0
    zero = torch.isinf(inv)
    return torch.where(zero, 1.0, a * inv), torch.where(zero, 0.0, b * inv)


def _map_device(t: dict, x: torch.Tensor) -> torch.Tensor:
    """One (block, d) float32 block -> e' (block, d) float32, see :meth:`AnisoAlign._map_torch`."""
    m, d, eps = t["m"], t["d"], t["eps"]
    proj = torch.addmm(t["proj_bias"], x, t["proj"])  # (n, r + d [+ h]) = [a | b | v0 | first layer on v0]
    a, b, v0 = proj[:, :m], proj[:, m : 2 * m], proj[:, 2 * m : 2 * m + d]
    sq = a * a + b * b
    rho = torch.sqrt(sq + eps)
    cos, sin = _direction(a, b, sq)
    rho0 = _radial_device(t, rho) if "knots_text" in t else rho
    if "shrink" in t:  # c0 = gamma c_paper + (1 - gamma) c_glob, then polar again (GlobalInit.state)
        gamma, scale = t["shrink"]
        mag = torch.sqrt(torch.clamp(rho0 * rho0 - eps, min=0.0))
        offset = t["shrink_offset"]
        a = gamma * (mag * cos) + scale * a + offset[:m]
        b = gamma * (mag * sin) + scale * b + offset[m:]
        sq = a * a + b * b
        rho0 = torch.sqrt(sq + eps)
        cos, sin = _direction(a, b, sq)
    rho_hat, v_hat = rho0, v0
    if "layers" in t:  # g_eta on [sin; cos; log rho0; v0], its v0 part already in ``proj``
        fn = torch.nn.functional
        h = torch.addmm(proj[:, 2 * m + d :], torch.cat([sin, cos, torch.log(rho0)], dim=1), t["first"])
        for weight, bias, ln_w, ln_b, ln_eps in t["layers"]:
            if weight is not None:
                h = fn.linear(h, weight, bias)
            h = fn.silu(fn.layer_norm(h, (h.shape[1],), ln_w, ln_b, ln_eps))
        out = fn.linear(h, *t["head"]) if t["head"] is not None else h
        alpha_theta, alpha_rho, alpha_v, reproject = t["bounds"]
        delta = alpha_theta * torch.tanh(out[:, :m])
        cos_d, sin_d = torch.cos(delta), torch.sin(delta)  # theta_hat = theta0 + delta (wrap: same cos, sin)
        cos, sin = cos * cos_d - sin * sin_d, sin * cos_d + cos * sin_d
        rho_hat = rho0 * torch.exp(alpha_rho * torch.tanh(out[:, m : 2 * m]))
        if t["with_v"]:
            dv = out[:, 2 * m :]
            step = torch.tanh(dv - (dv @ t["basis"]) @ t["back"])
            if reproject:
                step = step - (step @ t["basis"]) @ t["back"]
            v_hat = v0 + alpha_v * step
    mag = torch.sqrt(torch.clamp(rho_hat * rho_hat - eps, min=0.0))
    return torch.addmm(v_hat, torch.cat([mag * cos, mag * sin], dim=1), t["back"])
