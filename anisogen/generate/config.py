"""The generation config: what determines the output bytes (fingerprinted) vs how the run executes.

``GenerateConfig`` is the single source of truth built by ``pipelines/generate.py`` from its flags.
:meth:`GenerateConfig.output_config` is the part that determines the shard bytes; its sha256
(:func:`anisogen.shards.schema.fingerprint`) is stored in the manifest and a rerun with a different one is
refused unless ``overwrite``. Execution settings (workers, threads, executor, progress, verification
mode) can change between a run and its resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..shards.schema import EMB_DTYPES
from ..cli import UserError


def _has_glob_matches(pattern: str) -> bool:
    import glob

    return any(ch in pattern for ch in "*?[") and bool(glob.glob(pattern))


class GenerateInputError(UserError):
    """A user error in what the flags point to (unknown aligner or model, bad parameter, unreadable image
    source, an aligner fitted for another model, a corrupt output folder): reported in one line, exit 2."""


@dataclass
class GenerateConfig:
    """All settings of one generation run (see ``pipelines/generate.py --help`` for each flag)."""

    # input
    corpus: list[str]
    out: str
    text_field: str = "text"
    id_field: str | None = None
    limit: int | None = None
    streaming: bool | None = None
    split: str = "train"
    hub_config: str | None = None
    dedup: bool = False
    # model
    model: str = "toy"
    pretrained: str | None = None
    # aligner
    aligner: str | None = None
    aligner_params: dict[str, Any] = field(default_factory=dict)
    aligner_dir: str | None = None
    images: str | None = None
    fit_samples: int = 50_000
    fit_images: int | None = None
    seed: int = 0
    # shards
    samples_per_shard: int = 10_000
    dtype: str = "fp16"
    keep_source: bool = False
    # encoding (affects float rounding, hence the bytes)
    batch_size: int = 256
    bucket_window: int | None = None
    precision: str = "auto"
    pad_multiple: int | None = None
    # execution (not fingerprinted)
    device: str | None = None
    compile: bool = False
    workers: int = 1
    threads: int | None = None
    executor: str = "accelerate"
    ray_address: str | None = None
    ray_retries: int = 3
    ray_gpus_per_task: float | None = None
    worker_index: int = 0
    num_workers: int = 1
    overwrite: bool = False
    verify: str = "sha256"
    fit_only: bool = False
    cache_dir: str | None = None
    progress: bool = True
    manifest_interval_s: float = 30.0
    allow_empty: bool = False

    #: Fields that do not affect the output bytes.
    RUNTIME_FIELDS = ("out", "device", "compile", "workers", "threads", "executor", "ray_address", "ray_retries",
                      "ray_gpus_per_task", "worker_index", "num_workers", "overwrite", "verify", "fit_only",
                      "cache_dir", "progress", "manifest_interval_s", "allow_empty")

    def validate(self) -> "GenerateConfig":
        """Check flag combinations; raises ``ValueError`` naming the flag."""
        if not self.corpus:
            raise ValueError("--corpus is required")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.samples_per_shard > 999_999:
            raise ValueError("--samples-per-shard must be < 1,000,000 (keys hold 6 row digits)")
        if self.dtype not in EMB_DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(EMB_DTYPES)}, got {self.dtype!r}")
        if self.aligner_dir and self.aligner:
            raise ValueError("give either --aligner NAME --images PATH (fit) or --aligner-dir DIR (reuse), not both")
        if not self.aligner_dir and not self.aligner:
            raise ValueError("an aligner is required: --aligner NAME --images PATH, or --aligner-dir DIR")
        if self.aligner and not self.images:
            raise ValueError(f"--aligner {self.aligner} needs --images PATH (unpaired image embeddings to fit on)")
        if self.aligner_params and not self.aligner:
            raise ValueError("--param applies only when fitting with --aligner")
        if self.fit_samples < 1:
            raise ValueError(f"--fit-samples must be >= 1, got {self.fit_samples}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.executor not in ("accelerate", "ray"):
            raise ValueError(f"--executor must be accelerate or ray, got {self.executor!r}")
        if self.verify not in ("sha256", "size", "none"):
            raise ValueError(f"--verify must be sha256, size or none, got {self.verify!r}")
        if not (0 <= self.worker_index < self.num_workers):
            raise ValueError(f"--job-index {self.worker_index} must be in [0, --num-jobs={self.num_workers})")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        return self

    def check_references(self) -> "GenerateConfig":
        """Check what the flags name before any work: the aligner and its parameters, the image source and
        the aligner folder. Raises :class:`GenerateInputError` naming the flag."""
        import os

        from ..align import get_aligner_class

        if self.aligner:
            try:
                get_aligner_class(self.aligner)(**self.aligner_params)
            except (ValueError, TypeError) as exc:
                flag = "--aligner" if "unknown aligner" in str(exc) else "--param"
                raise GenerateInputError(f"{flag}: {exc}") from None
        if self.images and not (os.path.exists(self.images) or _has_glob_matches(self.images)):
            raise GenerateInputError(f"--images {self.images}: no such file or folder; give unpaired image "
                                     "embeddings (.npy file or folder), an image folder or image shards")
        if self.aligner_dir and not os.path.isfile(os.path.join(self.aligner_dir, "config.json")):
            raise GenerateInputError(f"--aligner-dir {self.aligner_dir}: not an aligner artifact (no config.json); "
                                     "give a folder written by fit.py or by an earlier generate run (OUT/aligner)")
        return self

    def output_config(self) -> dict[str, Any]:
        """The fingerprinted part: every field that changes the produced bytes (JSON-serialisable)."""
        d = asdict(self)
        for k in self.RUNTIME_FIELDS:
            d.pop(k, None)
        return json.loads(json.dumps(d))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))
