"""AnisoAlign (arXiv 2605.07825, spec §2) and its Table-4 ablations, as registered aligners.

Fitting (unpaired text and image embeddings, spec §2.10):

1. Frame (:mod:`.frame`): Sigma = Sigma_t + Sigma_i + lambda I from the streaming float64 moments; Q_U = top-r
   sign-fixed eigenvectors, Q_V the rest; mixing R (Haar by default); B = Q_U R.
2. Statistic-estimation sample: up to ``max_train_samples`` images and texts, drawn uniformly in one
   streaming pass each (:func:`.training.reservoir_sample`).
3. Stage I statistics (:mod:`.prior`): image polar coordinates of B^T x (raw x) -> psi, alpha, M -> (A, eta), graph E.
4. Stage II-a (:mod:`.init`): radial quantile maps T_k (text radii of B^T y_bar vs image radii) and D_V.
5. Stage I training: the score network s_phi by wrapped-Gaussian DSM (eq. 6); frozen.
6. Stage II-b (:mod:`.refine`): g_eta trained on the text initial states with the variant's objective.
7. Final centroid calibration (shared with ReAlign, :class:`anisogen.align.base.Aligner`): mu_hat = mean of
   Norm(e') over the fit texts, stored; every transform returns e = Norm(Norm(e') - mu_hat + mu_i).

Transform (deterministic, row-wise, batch-independent): global init -> g_eta -> bounded update (eq. 7) ->
e' = B c_hat + v_hat (spec §2.9). Rows are processed in fixed-shape, zero-padded blocks of
``transform_block`` rows so every BLAS call has the same shape whatever the batch: a row's output bits do
not depend on which other rows are transformed with it.

Variants (Table 4; the objective of g_eta):

=====================  ==========================================================================
``anisoalign-init``    global initialisation only, no Stage I training, no g_eta
``anisoalign-refine``  g_eta trained with 1e-3 ||tanh(.)||^2 only (spec Q3). With the zero-initialised head
                       this objective is stationary at zero, so the result equals ``anisoalign-init``
``anisoalign-prior``   L_II only (Stage I trained)
``anisoalign-phase``   lambda_Phi L_Phi only; L_Phi >= 0 is zero, with zero gradient, at zero refinement, so
                       this also equals ``anisoalign-init`` (recorded, not hidden: see docs/ANISOALIGN.md)
``anisoalign``         L_II + lambda_Phi L_Phi (spec §2.8 [INF] total objective)
=====================  ==========================================================================

Parameters (``default_params``; [INF] = not stated by the paper, the spec's recommendation or ours):

Frame: ``rank`` r (even; None -> ``energy`` rule or the even integer nearest d/10 [INF]); ``energy``
(cumulative-energy threshold for r, e.g. 0.9); ``ridge`` lambda = 1e-6 [INF]; ``eps`` = 1e-8 [INF] (polar
radius, block weights, D_V, L_Phi weights); ``mixing`` "haar" [INF Q1] | "learned" | "identity";
``mixing_steps`` 200, ``mixing_lr`` 0.01 (learned R only).

Stage I: ``partners`` p = 4 [INF]; ``tau`` = 0.1 [INF]; ``sigma_min`` 0.01, ``sigma_max`` 1.0 [INF]
(sigma_t = sigma_min^{1-t} sigma_max^t, t ~ U(0,1)); ``wrap_terms`` 3 [INF]; ``score_hidden`` 256,
``score_layers`` 3, ``score_fourier`` 8 (CPU default; the spec's GPU recommendation is 4 x 1024)
[INF]; ``stage1_steps`` 2000 (spec GPU: ~50k), ``stage1_lr`` 1e-3 (spec GPU: 1e-4).

Stage II-a: ``radial_map`` "quantile" | "identity" (T_k = id); ``radial_knots`` 4096 [INF Q8];
``v_scaling`` "std_ratio" | "identity" (D = I).

Stage II-b: ``refiner_hidden`` 256, ``refiner_layers`` 2 (spec GPU: 2 x 2048) [INF];
``alpha_theta`` 0.2, ``alpha_rho`` 0.1, ``alpha_v`` 0.002 [INF]; ``reproject_v`` True [INF];
``lambda_phi`` 1.0 [INF Q4]; ``identity_weight`` 1e-3 [INF Q3]; ``prior_gradient`` "full" [INF Q5] |
"sds"; ``stage2_steps`` (None -> ``stage2_epochs`` x sample / batch, at least ``stage2_min_steps`` 200),
``stage2_epochs`` 1.0,
``stage2_lr`` 1e-3 (spec GPU: 1e-4, 1-3 epochs).

Loops: ``batch_size`` 1024 (spec GPU: 4096); ``weight_decay`` 0.0 (AdamW); ``max_train_samples``
200000 (per modality; the spec wants >= 2e5 texts for Stage II); ``early_stop_patience`` None (fixed
length) or a number of evaluations without a relative improvement of ``min_delta`` (1e-3);
``eval_every`` 100; ``log_every`` 25; ``val_size`` 2048. ``transform_block`` 1024 rows; ``threads`` 1:
torch intra-op threads while fitting and transforming (None = leave the caller's setting).

History (``history.json``): ``stage1_L_I``, ``stage2_objective`` and per-term ``stage2_L_II`` / ``stage2_L_Phi``
/ ``stage2_identity`` (window means), ``*_val`` with ``*_val_step`` (fixed validation batch),
``mixing_stability*`` (learned R), ``*_steps_run``, and wall times ``seconds_frame_stats_init``,
``seconds_stage1``, ``seconds_stage2`` (the final calibration pass is not included).

Tensors in the artifact: ``mu_text``, ``mu_image``, ``mu_hat`` (d,); ``frame.*`` (eigenvalues, q_u, q_v,
mixing, basis); ``prior.*`` (anchor, weights, strength, offset, edges); ``init.*`` (d_v, levels,
text_knots, image_knots); ``score_net.*`` and ``refiner.*`` (float32 network weights).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np
import torch

from ..base import Aligner, FitContext, register_aligner
from .frame import MIXINGS, Frame, eigen_frame, haar_orthogonal, learn_mixing
from .init import RADIAL_MAPS, V_SCALINGS, GlobalInit, RadialMap, fit_radial_map, v_side_scaling
from .polar import from_polar, to_polar
from .prior import DiffusionConfig, PhasePrior, ScoreNet, build_score_net, phase_statistics, train_score_net
from .refine import Bounds, Refiner, Stage2Objective, bounded_update, build_refiner, refiner_features, train_refiner
from .training import LoopConfig, reservoir_sample, torch_threads

DEFAULT_PARAMS: dict[str, Any] = {
    # frame
    "rank": None, "energy": None, "ridge": 1e-6, "eps": 1e-8,
    "mixing": "haar", "mixing_steps": 200, "mixing_lr": 1e-2,
    # Stage I
    "partners": 4, "tau": 0.1, "sigma_min": 0.01, "sigma_max": 1.0, "wrap_terms": 3,
    "score_hidden": 256, "score_layers": 3, "score_fourier": 8, "stage1_steps": 2000, "stage1_lr": 1e-3,
    # Stage II-a
    "radial_map": "quantile", "radial_knots": 4096, "v_scaling": "std_ratio",
    # Stage II-b
    "refiner_hidden": 256, "refiner_layers": 2,
    "alpha_theta": 0.2, "alpha_rho": 0.1, "alpha_v": 0.002, "reproject_v": True,
    "lambda_phi": 1.0, "identity_weight": 1e-3, "prior_gradient": "full",
    "stage2_steps": None, "stage2_epochs": 1.0, "stage2_min_steps": 200, "stage2_lr": 1e-3,
    # loops
    "batch_size": 1024, "weight_decay": 0.0, "max_train_samples": 200_000, "early_stop_patience": None,
    "min_delta": 1e-3, "eval_every": 100, "log_every": 25, "val_size": 2048,
    # execution
    "transform_block": 1024, "threads": 1,
}


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"anisoalign: {name} must be one of {list(options)}, got {value!r}")


@register_aligner
class AnisoAlign(Aligner):
    """Full AnisoAlign: global init + g_eta trained with L_II + lambda_Phi L_Phi. See the module docstring."""

    name = "anisoalign"
    default_params = DEFAULT_PARAMS
    centroid_calibration = True
    #: train the Stage-I score network
    uses_score_net: ClassVar[bool] = True
    #: Stage-II objective terms; empty = no refiner at all (global init only)
    stage2_losses: ClassVar[tuple[str, ...]] = ("prior", "phase")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.frame: Frame | None = None
        self.prior: PhasePrior | None = None
        self.init: GlobalInit | None = None
        self.score_net: ScoreNet | None = None
        self.refiner: Refiner | None = None

    # ----------------------------------------------------------------------------- fitting
    def _validate_params(self) -> None:
        p = self.params
        _choice("mixing", p["mixing"], MIXINGS)
        _choice("radial_map", p["radial_map"], RADIAL_MAPS)
        _choice("v_scaling", p["v_scaling"], V_SCALINGS)
        _choice("prior_gradient", p["prior_gradient"], ("full", "sds"))
        for key in ("alpha_theta", "alpha_rho", "alpha_v"):
            if not float(p[key]) >= 0:
                raise ValueError(f"anisoalign: {key} must be >= 0, got {p[key]}")
        if not 0 < float(p["sigma_min"]) <= float(p["sigma_max"]):
            raise ValueError(f"anisoalign: need 0 < sigma_min <= sigma_max, got {p['sigma_min']}, {p['sigma_max']}")
        if int(p["max_train_samples"]) < 2:
            raise ValueError(f"anisoalign: max_train_samples must be >= 2, got {p['max_train_samples']}")

    def _loop(self, ctx: FitContext, *, steps: int, lr: float, seed: int) -> LoopConfig:
        p = self.params
        return LoopConfig(steps=int(steps), batch_size=int(p["batch_size"]), lr=float(lr),
                          weight_decay=float(p["weight_decay"]), device=ctx.device, seed=int(seed),
                          log_every=int(p["log_every"]), eval_every=int(p["eval_every"]),
                          patience=None if p["early_stop_patience"] is None else int(p["early_stop_patience"]),
                          min_delta=float(p["min_delta"]), val_size=int(p["val_size"]), progress=ctx.progress,
                          threads=p["threads"])

    def _fit(self, ctx: FitContext) -> None:
        with torch_threads(self.params["threads"]):
            self._fit_stages(ctx)

    def _fit_stages(self, ctx: FitContext) -> None:
        if ctx.reducer is not None:
            raise ValueError(
                f"{self.name}: fitting across processes (reducer) is not supported, because Stage I/II train "
                "networks on one process's sample; fit once in a single process and share the artifact"
            )
        self._validate_params()
        p, seed = self.params, self.seed
        eps = float(p["eps"])
        clock = time.perf_counter()
        mu_t, mu_i = ctx.text_moments.mean, ctx.image_moments.mean
        frame = eigen_frame(ctx.text_moments, ctx.image_moments, ridge=float(p["ridge"]), rank=p["rank"], energy=p["energy"])
        cap = int(p["max_train_samples"])
        q_u = frame.q_u
        image_u = reservoir_sample(ctx.image_chunks(), cap, seed, fn=lambda x: x @ q_u)  # unmixed coords (n, r)
        text_rows = reservoir_sample(ctx.text_chunks(), cap, seed + 1, dtype=np.float32)  # (n, d)
        self.fit_counts.update({"image_sample": int(image_u.shape[0]), "text_sample": int(text_rows.shape[0])})

        # mixing R (spec Q1)
        if p["mixing"] == "identity":
            mixing = np.eye(frame.rank)
        else:
            mixing = haar_orthogonal(frame.rank, seed)
            if p["mixing"] == "learned":
                mixing, hist = learn_mixing(image_u, mixing, eps=eps,
                                            loop=self._loop(ctx, steps=p["mixing_steps"], lr=p["mixing_lr"], seed=seed + 3))
                self._add_history(hist, "mixing")
        frame.mixing = mixing
        basis = frame.basis

        # Stage I statistics on image polar coordinates (raw x)
        rho_x, theta_x = to_polar(image_u @ mixing, eps)
        prior = phase_statistics(rho_x, theta_x, partners=int(p["partners"]), eps=eps)

        # Stage II-a: radial maps and D_V
        rho_y, _ = to_polar(self._blockwise(text_rows, lambda rows: (rows - mu_t + mu_i) @ basis), eps)
        radial = fit_radial_map(rho_y, rho_x, int(p["radial_knots"])) if p["radial_map"] == "quantile" else None
        if p["v_scaling"] == "std_ratio":
            d_v = v_side_scaling(ctx.text_moments, ctx.image_moments, frame.q_v, eps)
        else:
            d_v = np.ones(frame.q_v.shape[1])

        self.tensors.update({"mu_text": mu_t, "mu_image": mu_i, **frame.tensors(), **prior.tensors()})
        self.tensors.update(GlobalInit(mu_t, mu_i, frame, radial, d_v, eps).tensors())
        self._build_runtime()
        clock = self._lap("seconds_frame_stats_init", clock)

        # Stage I: score network
        diffusion = self._diffusion()
        if self.uses_score_net:
            net = self._new_score_net(frame.blocks, seed + 4)
            hist = train_score_net(net, theta_x, rho_x, prior, diffusion=diffusion,
                                   loop=self._loop(ctx, steps=p["stage1_steps"], lr=p["stage1_lr"], seed=seed + 5))
            self._add_history(hist, "stage1")
            self.tensors.update(_state_tensors("score_net.", net))
            clock = self._lap("seconds_stage1", clock)

        # Stage II-b: refiner
        if self.stage2_losses:
            theta0, rho0, v0 = self._blockwise(text_rows, self.init.state, outputs=3, dtype=np.float32)
            refiner = self._new_refiner(frame.blocks, seed + 6)
            n = theta0.shape[0]
            steps = p["stage2_steps"]
            if steps is None:
                steps = max(int(p["stage2_min_steps"]),
                            math.ceil(float(p["stage2_epochs"]) * n / min(int(p["batch_size"]), n)))
            score_net = self._load_module(self._new_score_net(frame.blocks, 0), "score_net.") if self.uses_score_net else None
            hist = train_refiner(refiner, theta0, rho0, v0, basis=basis, prior=prior, score_net=score_net,
                                 objective=self._objective(), bounds=self._bounds(), diffusion=diffusion, eps=eps,
                                 loop=self._loop(ctx, steps=steps, lr=p["stage2_lr"], seed=seed + 7))
            self._add_history(hist, "stage2")
            self.tensors.update(_state_tensors("refiner.", refiner))
            self._lap("seconds_stage2", clock)
        self._build_runtime()

    def _lap(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.history[key] = [now - since]
        return now

    def _add_history(self, hist: dict, stage: str) -> None:
        for key, values in hist.items():
            name = f"{stage}_steps_run" if key == "_steps_run" else key
            self.history[name] = [float(v) for v in values]

    # -------------------------------------------------------------------------- components
    def _diffusion(self) -> DiffusionConfig:
        p = self.params
        return DiffusionConfig(tau=float(p["tau"]), sigma_min=float(p["sigma_min"]), sigma_max=float(p["sigma_max"]),
                               n_terms=int(p["wrap_terms"]))

    def _bounds(self) -> Bounds:
        p = self.params
        return Bounds(float(p["alpha_theta"]), float(p["alpha_rho"]), float(p["alpha_v"]), bool(p["reproject_v"]))

    def _objective(self) -> Stage2Objective:
        p = self.params
        return Stage2Objective(self.stage2_losses, float(p["lambda_phi"]), float(p["identity_weight"]), p["prior_gradient"])

    def _new_score_net(self, blocks: int, seed: int) -> ScoreNet:
        p = self.params
        return build_score_net(blocks, hidden=int(p["score_hidden"]), layers=int(p["score_layers"]),
                               fourier=int(p["score_fourier"]), sigma_min=float(p["sigma_min"]),
                               sigma_max=float(p["sigma_max"]), seed=seed)

    def _new_refiner(self, blocks: int, seed: int) -> Refiner:
        p = self.params
        return build_refiner(blocks, self.dim, hidden=int(p["refiner_hidden"]), layers=int(p["refiner_layers"]), seed=seed)

    def _load_module(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        state = {key[len(prefix):]: torch.from_numpy(np.array(value)) for key, value in self.tensors.items()
                 if key.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        return module.eval().requires_grad_(False)

    def _build_runtime(self) -> None:
        """(Re)build frame, prior, global init and networks from ``self.tensors`` (fit and load share this)."""
        t = self.tensors
        eps = float(self.params["eps"])
        self.frame = Frame.from_tensors(t)
        self.prior = PhasePrior.from_tensors(t)
        self.init = GlobalInit(t["mu_text"], t["mu_image"], self.frame, RadialMap.from_tensors(t), t["init.d_v"], eps)
        blocks = self.frame.blocks
        self.score_net = self._load_module(self._new_score_net(blocks, 0), "score_net.") if any(
            k.startswith("score_net.") for k in t) else None
        self.refiner = self._load_module(self._new_refiner(blocks, 0), "refiner.") if any(
            k.startswith("refiner.") for k in t) else None
        self._basis = np.ascontiguousarray(t["frame.basis"])
        self._basis64 = torch.from_numpy(self._basis)

    def _load_state(self, config, tensors, history) -> None:
        super()._load_state(config, tensors, history)
        self._build_runtime()

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

    def _map_block(self, block: np.ndarray):
        theta0, rho0, v0 = self.init.state(block)
        if self.refiner is not None:
            state = [torch.from_numpy(a) for a in (theta0, rho0, v0)]
            with torch.no_grad():
                feats = refiner_features(*(s.to(torch.float32) for s in state))
                deltas = [d.to(torch.float64) for d in self.refiner(feats)]
                theta_hat, rho_hat, v_hat, _ = bounded_update(*state, *deltas, self._basis64, self._bounds())
            theta_hat, rho_hat, v_hat = theta_hat.numpy(), rho_hat.numpy(), v_hat.numpy()
        else:
            theta_hat, rho_hat, v_hat = theta0, rho0, v0
        mapped = from_polar(rho_hat, theta_hat, float(self.params["eps"])) @ self._basis.T + v_hat
        return theta0, rho0, v0, theta_hat, rho_hat, v_hat, mapped

    def _map(self, text: np.ndarray) -> np.ndarray:
        with torch_threads(self.params["threads"]):
            return self._blockwise(text, lambda block: self._map_block(block)[-1])


def _state_tensors(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {prefix + key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


@register_aligner
class AnisoAlignInit(AnisoAlign):
    """Table 4 "Global Init only": Stage II-a state, reconstructed and centroid-calibrated; no networks."""

    name = "anisoalign-init"
    uses_score_net = False
    stage2_losses = ()


@register_aligner
class AnisoAlignRefine(AnisoAlign):
    """Table 4 "+ Refinement": g_eta trained by the identity regulariser only (spec Q3); equals the init."""

    name = "anisoalign-refine"
    uses_score_net = False
    stage2_losses = ("identity",)


@register_aligner
class AnisoAlignPrior(AnisoAlign):
    """Table 4 "+ Refinement + L_II": g_eta trained by the prior-matching loss only."""

    name = "anisoalign-prior"
    stage2_losses = ("prior",)


@register_aligner
class AnisoAlignPhase(AnisoAlign):
    """Table 4 "+ Refinement + L_Phi": g_eta trained by lambda_Phi L_Phi only (stationary at zero: equals the init)."""

    name = "anisoalign-phase"
    uses_score_net = False
    stage2_losses = ("phase",)
