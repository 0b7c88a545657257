"""The toy CLIP's training hyper-parameters, free of torch so that ``train_toyclip.py --help`` is instant.

:mod:`anisogen.toyworld.clip_training` (which trains with them) re-exports :class:`TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_toyclip` (all recorded in the weights' metadata)."""

    model: str = "toy"
    n_scenes: int = 60_000
    caption_seeds: int = 1
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 150
    seed: int = 0
    eval_every: int = 250
    eval_pairs: int = 2000
    threads: int = 1
