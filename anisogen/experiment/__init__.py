"""The text-only-training experiment on the toy world (issue 9; ``pipelines/experiment.py``).

One concept per module: :mod:`.config` (settings, ``full``/``ci`` presets), :mod:`.world` (scenes,
captions, instructions, CLIP embeddings), :mod:`.textlm` (the tiny LM's text pretraining),
:mod:`.scoring` (caption attributes, QA, POPE), :mod:`.runs` (one trainer run + its evaluations),
:mod:`.stage1` (aligners, Oracle, Blind: transfer probe + captioners over seeds), :mod:`.probe` (transfer
probe, bootstrap CIs), :mod:`.stage2` (APP, Gap-Init, MoReS), :mod:`.goals`,
:mod:`.paper` (reported numbers, qualitative), :mod:`.report` (``docs/EXPERIMENTS.md``) and
:mod:`.runner` (the whole pipeline).
"""

from .config import ExperimentConfig, preset
from .runner import run_experiment, write_report

__all__ = ["ExperimentConfig", "preset", "run_experiment", "write_report"]
