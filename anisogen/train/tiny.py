"""A tiny Llama model and a byte-level tokenizer built in-process (no downloads).

Used by the tests, the CI smoke runs (``--lm tiny``) and the benchmarks. The tokenizer is a byte-level
BPE with no merges: every UTF-8 byte is one token, so any text round-trips exactly, and a ChatML-style
chat template makes ``hf_chat`` usable. Special tokens: ``<pad>`` (0), ``<s>``, ``</s>``, ``<unk>``,
``<|im_start|>``, ``<|im_end|>`` (the EOS token) and ``<image>`` (the visual placeholder).
"""

from __future__ import annotations

import torch

TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]

#: ChatML-style template; every turn ends with the EOS token ``<|im_end|>``.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(*, pad_is_eos: bool = False, train_texts=None, vocab_size: int = 1024):
    """Return a ``PreTrainedTokenizerFast``: byte-level, no merges, vocab 256 + 7 specials.

    ``pad_is_eos=True`` makes the pad token equal to EOS (the case that breaks collators which derive
    the attention mask from ``input_ids != pad_id``); used to test that ours does not.

    ``train_texts`` (an iterable of strings): learn byte-level BPE merges on them with the
    ``tokenizers`` trainer, up to ``vocab_size`` entries (specials and the 256 bytes included), so
    frequent words become single tokens while any text still round-trips. Deterministic in the texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if train_texts is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size={vocab_size} is below the {len(vocab)} specials and bytes")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                      initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator(list(train_texts), trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<|im_start|>"],
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    wrapped.model_max_length = 4096
    return wrapped


def build_tiny_lm(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    seed: int = 0,
    tokenizer=None,
):
    """Return a randomly initialised ``LlamaForCausalLM`` (fp32, eager attention), seeded.

    ``num_kv_heads < num_heads`` gives a grouped-query-attention model (k/v_proj output smaller
    than ``hidden_size``). Token ids of ``tokenizer`` (if given) are written into the config.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if tokenizer is not None:
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    return model
