"""What the task function runs with: one :func:`build_context` for every executor.

A :class:`Context` holds the opened corpus, the tokenizer and duplicate map (the worker side,
:class:`TaskInputs`) and the encoder, aligner and its device transform (the device side,
:class:`TaskOutputs`). The accelerate/Slurm executor builds it once per process from what ``generate``
already loaded; Ray workers build it from a :class:`ContextFactory` (a picklable config) once per worker
process, loading the model and the saved aligner themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..encode.corpus import Corpus
from ..encode.text import TextEncoder
from ..shards import writer
from ..shards.schema import ALIGNER_DIRNAME
from .config import GenerateConfig
from .task import TaskInputs, TaskOutputs

DEDUP_NAME = "dedup.npz"


@dataclass
class Context:
    """Everything the task function needs in one process."""

    inputs: TaskInputs
    outputs: TaskOutputs
    model: Any
    preprocess: Any
    model_fingerprint: str
    corpus: Corpus
    encoder: TextEncoder


def open_corpus(cfg: GenerateConfig) -> Corpus:
    return Corpus(cfg.corpus, text_field=cfg.text_field, id_field=cfg.id_field, limit=cfg.limit,
                  streaming=cfg.streaming, split=cfg.split, hub_config=cfg.hub_config, cache_dir=cfg.cache_dir)


def make_encoder(cfg: GenerateConfig, bundle, device: torch.device) -> TextEncoder:
    model, _, tokenizer = bundle
    return TextEncoder(model, tokenizer, device=device, batch_size=cfg.batch_size, bucket_window=cfg.bucket_window,
                       precision=cfg.precision, compile=cfg.compile, pad_multiple=cfg.pad_multiple)


def load_duplicates(out: Path) -> dict[int, int]:
    """The exact-duplicate map of the dedup scan (``OUT/dedup.npz``): row -> first row with that text."""
    import numpy as np

    path = Path(out) / DEDUP_NAME
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return dict(zip(z["rows"].tolist(), z["first"].tolist()))


def build_context(cfg: GenerateConfig, device: torch.device, *, out: Path, bundle=None, aligner=None,
                  corpus: Corpus | None = None, encoder: TextEncoder | None = None) -> Context:
    """The task context; loads what is not given: the model (:func:`load_clip`), the corpus, the aligner
    (``--aligner-dir`` or ``OUT/aligner``) and the duplicate map (``OUT/dedup.npz``)."""
    from ..encode.clip import load_clip

    if bundle is None:
        bundle = load_clip(cfg.model, cfg.pretrained, device=device)
    model, preprocess, _ = bundle
    fp = model.anisogen_fingerprint
    corpus = corpus if corpus is not None else open_corpus(cfg)
    encoder = encoder if encoder is not None else make_encoder(cfg, bundle, device)
    if aligner is None:
        from ..align import load_aligner

        aligner = load_aligner(cfg.aligner_dir or Path(out) / ALIGNER_DIRNAME, model_fingerprint=fp)
    inputs = TaskInputs(corpus, encoder.tokenizer, load_duplicates(out))
    outputs = TaskOutputs(str(out), encoder, aligner, fp, cfg.dtype, cfg.keep_source)
    return Context(inputs, outputs, model, preprocess, fp, corpus, encoder)


@dataclass(frozen=True)
class ContextFactory:
    """A picklable recipe for :func:`build_context` in another process (Ray workers).

    Calling it builds the context on that process's device and checks that it loaded the same model as
    the driver. ``key`` identifies the run, so a worker process can keep one context for many tasks.
    """

    cfg: dict
    model_fingerprint: str

    @classmethod
    def for_run(cls, cfg: GenerateConfig, model_fingerprint: str) -> "ContextFactory":
        d = asdict(cfg)
        d["progress"] = False
        return cls(d, model_fingerprint)

    @property
    def key(self) -> str:
        return repr(sorted(self.cfg.items())) + self.model_fingerprint

    def __call__(self) -> Context:
        cfg = GenerateConfig(**self.cfg)
        torch.set_num_threads(cfg.threads or 1)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
        ctx = build_context(cfg, device, out=Path(cfg.out))
        if ctx.model_fingerprint != self.model_fingerprint:
            raise RuntimeError(f"worker loaded model {ctx.model_fingerprint!r}, the driver has "
                               f"{self.model_fingerprint!r}: the same weights must be visible on every node")
        return ctx


def is_pending(out: str | Path, task: int, verify: str) -> bool:
    """True when ``task`` has no intact published shard; its stray temp files are removed then."""
    if writer.check_published(out, task, verify=verify) is not None:
        return False
    writer.remove_temps(out, task)
    return True
