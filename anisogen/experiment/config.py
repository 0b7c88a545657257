"""Settings of the text-only-training experiment and its two presets (``full`` and ``ci``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

#: Aligners of the stage-1 study (the AnisoAlign ablations follow the full method).
DEFAULT_ALIGNERS = ("identity", "unicorn", "c3", "realign", "anisoalign",
                    "anisoalign-init", "anisoalign-refine", "anisoalign-prior", "anisoalign-phase")

#: Stage-1 conditions trained as captioners (x seeds); the ablations are measured by the transfer probe only.
DEFAULT_MLLM_CONDITIONS = ("identity", "unicorn", "c3", "realign", "anisoalign", "oracle", "blind")

#: CPU-sized AnisoAlign settings (the library defaults are sized for 2e5 samples).
FAST_ANISO = {"stage1_steps": 300, "stage1_lr": 3e-3, "batch_size": 512, "stage2_min_steps": 150,
              "eval_every": 50, "val_size": 512}


@dataclass
class ExperimentConfig:
    """Every size, seed and hyper-parameter of one experiment run (stored in ``results.json``)."""

    out_dir: str
    preset: str = "full"
    lm: str = "tiny"  # "tiny" (pretrained here on toy text) or "smollm2"
    seed: int = 0
    # data (numbers of scenes)
    n_text: int = 3000  # train-split caption scenes (the text-only corpus)
    n_unpaired_images: int = 3000  # train-split images for fitting aligners (never the caption scenes)
    n_eval: int = 1000  # held-out scenes for caption evaluation and the transfer probe
    n_novel: int = 500  # novel-split scenes (held-out colour-shape pairs): probe and caption evaluation
    n_qa_scenes: int = 150  # held-out scenes for instruction QA and the POPE probe
    n_instruction_scenes: int = 800  # train scenes whose instruction conversations form stage 2
    # aligners
    aligners: tuple = DEFAULT_ALIGNERS
    # c3 keeps its original sigma: calibrate_phi=0.9 is unreachable on the toy CLIP (Phi is 0.88 noiseless)
    aligner_params: dict = field(default_factory=lambda: {n: dict(FAST_ANISO) for n in DEFAULT_ALIGNERS
                                                          if n.startswith("anisoalign")})
    stage2_aligner: str = "anisoalign"  # the substitutes used for the instruction data
    # tiny LM (byte-level BPE learned on the pretraining text) and its text pretraining
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_vocab: int = 1024
    lm_pretrain_steps: int = 1500
    lm_pretrain_batch: int = 32
    lm_pretrain_lr: float = 2e-3
    # stage 1: these conditions (aligners, "oracle", "blind") are trained once per seed
    mllm_conditions: tuple = DEFAULT_MLLM_CONDITIONS
    stage1_seeds: tuple = (0, 1, 2)
    stage1_steps: int = 300
    stage1_batch: int = 32
    stage1_lr: float = 5e-3
    # stage 2
    stage2_steps: int = 150
    stage2_batch: int = 16
    stage2_lr: float = 1e-3
    adapter_lr: float = 2e-3
    stage2_seeds: tuple = (0, 1, 2, 3, 4)
    app_spec: str = "energy:0.8"
    # evaluation
    caption_tokens: int = 48  # BPE tokens: the longest reference caption is about 40
    answer_tokens: int = 24
    eval_batch: int = 128
    threads: int = 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["aligners"] = list(self.aligners)
        d["stage2_seeds"] = list(self.stage2_seeds)
        d["stage1_seeds"] = list(self.stage1_seeds)
        d["mllm_conditions"] = list(self.mllm_conditions)
        return d


#: Reduced sizes for CI (tests/test_experiment.py): same code paths, minutes -> seconds.
CI_OVERRIDES = dict(
    n_text=600, n_unpaired_images=600, n_eval=40, n_novel=60, n_qa_scenes=10, n_instruction_scenes=150,
    aligners=("identity", "realign", "anisoalign"),
    mllm_conditions=("identity", "realign", "anisoalign", "oracle", "blind"),
    lm_hidden=64, lm_layers=2, lm_vocab=512, lm_pretrain_steps=200, lm_pretrain_batch=32, lm_pretrain_lr=3e-3,
    stage1_seeds=(0, 1), stage1_steps=60, stage2_steps=15, stage2_seeds=(0, 1), caption_tokens=40, answer_tokens=16,
    threads=1,
)
CI_ANISO = {"stage1_steps": 60, "stage1_lr": 3e-3, "batch_size": 256, "stage2_min_steps": 20, "eval_every": 20,
            "val_size": 128, "score_hidden": 64, "refiner_hidden": 64}


def preset(name: str, out_dir: str, **overrides) -> ExperimentConfig:
    """``full`` (the documented experiment) or ``ci`` (the reduced form run by the tests)."""
    if name == "full":
        cfg = ExperimentConfig(out_dir=out_dir, preset="full")
    elif name == "ci":
        cfg = ExperimentConfig(out_dir=out_dir, preset="ci", **CI_OVERRIDES)
        cfg.aligner_params = {n: dict(CI_ANISO) for n in cfg.aligners if n.startswith("anisoalign")}
    else:
        raise ValueError(f"unknown preset {name!r}; use 'full' or 'ci'")
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown experiment setting {k!r}")
        setattr(cfg, k, v)
    if "aligners" in overrides and "mllm_conditions" not in overrides:  # keep the captioners of the chosen aligners
        cfg.mllm_conditions = tuple(n for n in cfg.mllm_conditions if n in cfg.aligners or n in ("oracle", "blind"))
    unknown = sorted(set(cfg.mllm_conditions) - set(cfg.aligners) - {"oracle", "blind"})
    if unknown:
        raise ValueError(f"mllm_conditions {unknown} are neither aligners of this run nor oracle/blind")
    if not cfg.stage1_seeds:
        raise ValueError("stage1_seeds is empty: give at least one training seed")
    return cfg
