"""``TrainConfig``: every trainer setting, and which of them define a run's trajectory.

A checkpoint stores the config's *fingerprint*; resuming under a different fingerprint is refused
with the list of changed fields. Fields outside the fingerprint may change between a run and its
resume:

* bookkeeping (logging, evaluation, checkpoint cadence, trackers, post-processing);
* the run length (``max_steps``, ``epochs``): rerunning a finished run with more steps *extends* it
  (the cosine schedule is recomputed for the new length);
* ``batch_size`` and ``grad_accum``: a resume may change them, and the number of processes, as long
  as the global batch (``batch_size x grad_accum x processes``) stays the same -- the trainer checks
  that product itself and says which value keeps it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from ..cli import UserError

#: Config fields that do not change the training trajectory (may differ on resume).
NON_TRAJECTORY = {
    "resume", "halt_at_step", "progress", "eval_every", "eval_max_batches", "log_generations", "max_new_tokens",
    "log_every", "save_every", "keep_checkpoints", "report_to", "post", "val_shards", "val_jsonl",
    "max_steps", "epochs", "batch_size", "grad_accum", "num_workers", "loss_chunk_tokens", "output_dir",
}

#: Fields added after checkpoints existed: at this value they are left out of the fingerprint (and a
#: stored config without them reads as this value), so older checkpoints still resume.
ADDED_DEFAULTS = {"stage1_sampling": "resampled"}

class TrainInputError(UserError):
    """A training run cannot start as configured (flags, data, checkpoint or --init-from): one line, exit 2."""


REPORT_TO_HELP = ("experiment trackers through accelerate: 'auto' (TensorBoard, plus wandb / mlflow when "
                  "installed and configured by WANDB_API_KEY / WANDB_MODE / MLFLOW_TRACKING_URI), 'none', or a "
                  "comma-separated list of tensorboard,wandb,mlflow,...")

# Help texts and choices the command line needs, kept here (free of torch) so that ``--help`` is instant;
# anisogen.train.projector and anisogen.train.methods.app import them from here.
PROJECTOR_KINDS_HELP = "linear | mlp{N}x_gelu (e.g. mlp2x_gelu, LLaVA layout) | expand{k} (k tokens per vector)"
#: APP's treatment of 1-D tensors (``merge.py --bias``, ``AppConfig.bias_policy``).
BIAS_POLICIES = ("full", "drop", "scale")
#: The APP merge rules (``merge.py --app``, ``--post app:SPEC``).
APP_SPEC_HELP = (
    "energy:F (keep the smallest k explaining fraction F of sum(sigma^2), default energy:0.8) | "
    "ratio:R (k = floor(rank * R), e.g. ratio:0.25) | naive (plain task vector) | ties:D (keep the "
    "fraction D of largest-magnitude task-vector entries)"
)


@dataclass
class TrainConfig:
    """All trainer settings; ``pipelines/train.py --help`` documents each flag of the same name.

    ``lr``, ``adapter_lr`` and ``freeze_projector`` default to ``None``: the method's documented
    default for the stage (see ``docs/METHODS.md``); an explicit value overrides it.
    """

    output_dir: str
    lm: str = "tiny"
    # data
    train_shards: list = field(default_factory=list)
    val_shards: list = field(default_factory=list)
    train_jsonl: str | None = None
    val_jsonl: str | None = None
    emb_npy: str | None = None
    emb_shards: list = field(default_factory=list)
    prompt: str = ""
    template: str = "plain"
    image_prefix: str = "auto"
    max_length: int = 256
    l2_normalize: bool = True
    noise_std: float = 0.0
    on_error: str = "skip"
    num_workers: int = 1
    shuffle_buffer: int = 1000
    stage1_sampling: str = "resampled"  # "resampled" | "exact" (see docs/TRAINING.md, "Data")
    # model / method
    projector: str = "mlp2x_gelu"
    init_from: str | None = None
    method: str = "projector"
    method_options: dict = field(default_factory=dict)
    freeze_projector: bool | None = None
    grad_checkpointing: bool = False
    loss_chunk_tokens: int = 1024
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 0
    epochs: float = 1.0
    lr: float | None = None
    adapter_lr: float | None = None
    weight_decay: float | None = None
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"
    deterministic: bool = False
    # bookkeeping
    eval_every: int = 0
    eval_max_batches: int = 20
    log_generations: int = 4
    max_new_tokens: int = 32
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    halt_at_step: int = 0
    report_to: str = "auto"
    post: list = field(default_factory=list)
    progress: bool = True

    @property
    def stage(self) -> str:
        """``stage2`` for JSONL conversations, else ``stage1`` (captions from shards)."""
        return "stage2" if self.train_jsonl else "stage1"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        d = {k: v for k, v in self.to_dict().items()
             if k not in NON_TRAJECTORY and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def changed_fields(self, old: dict) -> list[str]:
        """Trajectory fields whose value differs from ``old`` (a stored ``to_dict()``)."""
        new = self.to_dict()
        return sorted(k for k in new if k not in NON_TRAJECTORY and old.get(k, ADDED_DEFAULTS.get(k)) != new[k])
