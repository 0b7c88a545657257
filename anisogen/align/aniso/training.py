"""The training loop shared by AnisoAlign's learned parts (learned mixing R, Stage I, Stage II).

* :func:`reservoir_sample` draws the *statistic-estimation sample*: at most ``cap`` rows, uniformly and
  reproducibly (seeded random keys, smallest ``cap`` kept), in one streaming pass over the chunks.
* :class:`BatchSampler` streams mini-batches from that sample: seeded epochs of random permutations.
* :class:`TrainingLoop` runs ``steps`` optimiser steps with a tqdm bar showing the loss, records window
  means of every reported loss and periodic validation values (the loss history saved in the artifact),
  and optionally stops early when the validation value stops improving (``patience``).

Randomness (batch order, diffusion times and noise) is drawn from CPU generators seeded from the
aligner seed and moved to the training device, so a run is reproducible on a given device.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (restored afterwards); ``None`` leaves it alone.

    The small matrices of AnisoAlign's networks gain little from intra-op parallelism, and on a busy
    machine OpenMP synchronisation can make a 2-thread op a thousand times slower than a 1-thread one.
    A fixed thread count also keeps CPU results reproducible whatever the caller's setting.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or a one-line ValueError when it is malformed, not available here, or
    neither a CPU nor a CUDA device."""
    from ..device import resolve_device

    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: AnisoAlign trains on 'cpu' or 'cuda[:N]'")
    return dev


def reservoir_sample(chunks: Iterable[np.ndarray], cap: int, seed: int, *,
                     fn: Callable[[np.ndarray], np.ndarray] | None = None, dtype=np.float64) -> np.ndarray:
    """Up to ``cap`` rows of ``fn(chunk)`` (default: the chunk itself), chosen uniformly at random.

    Every row gets a seeded uniform key; the ``cap`` rows with the smallest keys are kept, returned in
    key order as a ``dtype`` array (k, f) with k = min(cap, total rows). Deterministic for a given
    seed and chunking; memory O(cap x f).
    """
    if cap < 1:
        raise ValueError(f"sample cap must be >= 1, got {cap}")
    rng = np.random.default_rng([int(seed), 0x5A3B1E])
    kept_rows: np.ndarray | None = None
    kept_keys = np.zeros(0)
    for chunk in chunks:
        rows = np.asarray(fn(chunk) if fn is not None else chunk, dtype=dtype)
        keys = rng.random(rows.shape[0])
        rows = rows if kept_rows is None else np.concatenate([kept_rows, rows])
        keys = np.concatenate([kept_keys, keys])
        if keys.shape[0] > cap:
            keep = np.argpartition(keys, cap - 1)[:cap]
            rows, keys = rows[keep], keys[keep]
        kept_rows, kept_keys = rows, keys
    if kept_rows is None:
        raise ValueError("cannot sample from an empty source")
    order = np.argsort(kept_keys, kind="stable")
    return kept_rows[order]


class BatchSampler:
    """Indices of mini-batches over n rows: concatenated seeded random permutations (epochs)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("cannot draw batches from an empty sample")
        self.n, self.batch_size = n, int(min(batch_size, n))
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm = torch.randperm(n, generator=self.generator)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """(batch_size,) int64 CPU tensor of row indices."""
        if self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one training stage.

    steps: maximum optimiser steps (fixed-length run unless ``patience`` is set).
    batch_size, lr, weight_decay: AdamW mini-batch size, learning rate and decoupled weight decay.
    device: torch device string ("cpu", "cuda", "cuda:1", ...). seed: RNG seed of this stage.
    log_every: steps per history window (the history holds window means of the training losses).
    eval_every: steps between validation evaluations (a fixed validation batch, fixed noise).
    patience: stop after this many evaluations without a relative improvement of ``min_delta``;
        ``None`` runs all ``steps``. val_size: rows of the fixed validation batch.
    progress: show a tqdm bar with the running loss.
    threads: torch intra-op threads during the run (see :func:`torch_threads`; None = unchanged).
    lr_decays, lr_decay_factor: with ``patience``, the first ``lr_decays`` plateaus multiply the learning rate
        by ``lr_decay_factor`` and go on (from the best weights); the next plateau stops the run.
    """

    steps: int
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    device: str = "cpu"
    seed: int = 0
    log_every: int = 50
    eval_every: int = 100
    patience: int | None = None
    min_delta: float = 1e-3
    val_size: int = 2048
    progress: bool = False
    threads: int | None = 1
    lr_decays: int = 0
    lr_decay_factor: float = 0.3

    def derive(self, **changes) -> "LoopConfig":
        return replace(self, **changes)


class TrainingLoop:
    """Run ``step(i) -> {loss_name: value}`` for up to ``config.steps`` steps.

    ``evaluate() -> float`` runs on a fixed validation batch before the first step, every ``eval_every``
    steps and after the last step; its values form the ``<key>_val`` curve (with ``<key>_val_step``) and
    drive early stopping (lower is better unless ``maximise``). ``best_state()`` (optional) snapshots
    the model; with early stopping on, the snapshot at the best validation value is returned under
    ``"_best_state"`` (the caller restores it). ``"_steps_run"`` holds the number of steps taken.
    ``on_plateau(snapshot)`` (optional) is called when ``patience`` evaluations pass without improvement and
    ``config.lr_decays`` allows another decay: it lowers the learning rate (and may restore ``snapshot``,
    the best weights so far), and the run goes on; ``"_lr_decay_steps"`` lists where that happened.
    """

    def __init__(self, config: LoopConfig, desc: str, step: Callable[[int], dict], evaluate: Callable[[], float],
                 *, key: str, maximise: bool = False, best_state: Callable[[], object] | None = None,
                 on_plateau: Callable[[object], None] | None = None) -> None:
        self.config, self.desc, self.step, self.evaluate = config, desc, step, evaluate
        self.key, self.maximise, self.best_state, self.on_plateau = key, maximise, best_state, on_plateau

    def run(self) -> dict:
        with torch_threads(self.config.threads):
            return self._run()

    def _run(self) -> dict:
        cfg = self.config
        val_key = self.key + "_val"
        history: dict = {val_key: [], val_key + "_step": []}
        window: dict[str, list[float]] = {}
        sign = -1.0 if self.maximise else 1.0
        state = {"best": math.inf, "snapshot": None, "stale": 0}

        def record_val(step: int) -> None:
            value = float(self.evaluate())
            history[val_key].append(value)
            history[val_key + "_step"].append(float(step))
            score = sign * value
            best = state["best"]
            if not math.isfinite(best) or score < best - cfg.min_delta * abs(best):
                state["best"], state["stale"] = score, 0
                if self.best_state is not None and cfg.patience is not None:
                    state["snapshot"] = self.best_state()
            else:
                state["stale"] += 1

        def flush() -> None:
            for name, values in window.items():
                history.setdefault(name, []).append(float(np.mean(values)))
            window.clear()

        record_val(0)
        state["stale"] = 0
        done = 0
        decays: list[float] = []
        bar = tqdm(total=cfg.steps, desc=self.desc, disable=not cfg.progress, leave=False)
        try:
            for i in range(cfg.steps):
                losses = self.step(i)
                done = i + 1
                for name, value in losses.items():
                    window.setdefault(name, []).append(float(value))
                if done % cfg.log_every == 0:
                    flush()
                bar.update(1)
                bar.set_postfix({name: f"{value:.4g}" for name, value in losses.items()})
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    record_val(done)
                    if cfg.patience is not None and state["stale"] >= cfg.patience:
                        if self.on_plateau is None or len(decays) >= cfg.lr_decays:
                            break
                        self.on_plateau(state["snapshot"])
                        decays.append(float(done))
                        state["stale"] = 0
        finally:
            bar.close()
        flush()
        if history[val_key + "_step"][-1] != done:
            record_val(done)
        history["_steps_run"] = [float(done)]
        if decays:
            history["_lr_decay_steps"] = decays
        if state["snapshot"] is not None:
            history["_best_state"] = state["snapshot"]
        return history
