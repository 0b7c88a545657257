"""The bundled LLaVA-style trainer for (substitute) CLIP embeddings.

Public API:

* :class:`TrainConfig`, :func:`train` -- run stage 1 / stage 2 training (``pipelines/train.py``);
* :func:`load_export` -- load a trained export for inference in one call (``.generate``, ``.caption_loss``);
* :class:`EmbeddingLM`, :func:`build_projector`, :func:`load_lm`, :func:`get_template`;
* :func:`register_method`, :func:`register_postprocessor` -- the extension point (``methods/``).

Submodules are imported lazily so that ``import anisogen.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "trainer", "train": "trainer", "Trainer": "trainer",
    "load_export": "export", "ExportedModel": "export", "write_export": "export",
    "EmbeddingLM": "model", "PlaceholderMismatch": "model",
    "build_projector": "projector", "Projector": "projector",
    "load_lm": "lm", "smollm2_available": "lm",
    "get_template": "templates", "register_template": "templates", "TEMPLATES": "templates",
    "IGNORE_INDEX": "templates",
    "register_method": "methods", "register_postprocessor": "methods", "METHODS": "methods",
    "POSTPROCESSORS": "methods", "MethodContext": "methods", "MethodSetup": "methods", "ParamGroup": "methods",
    "EmbeddingTransform": "data", "SampleError": "data",
    "attribute_accuracy": "evaluation", "evaluate_export": "evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        mod = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
