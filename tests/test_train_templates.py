"""Templates: segment-wise labels, placeholder insertion, truncation, collation."""

import numpy as np
import pytest
import torch

from anisogen.train.data import Collator
from anisogen.train.templates import (
    IGNORE_INDEX, TEMPLATES, TemplateError, caption_conversation, get_template, target_spans,
)
from anisogen.train.tiny import build_tiny_tokenizer

IMG = 6  # id of <image> in the tiny tokenizer
CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the star?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "And its position?"},
    {"from": "gpt", "value": "Top left, naïvely speaking."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_ids(tok):
    assert tok.convert_tokens_to_ids("<image>") == IMG
    assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("name", ["vicuna_v1", "hf_chat"])
def test_chat_labels_decode_to_assistant_text(tok, name):
    enc = get_template(name).encode(CONV, tok, image_token_id=IMG, num_image_tokens=3)
    spans = target_spans(enc.labels)
    assert [tok.decode(s, skip_special_tokens=True) for s in spans] == ["It is red.", "Top left, naïvely speaking."]
    # every answer ends with the EOS token, which is a target (the model learns to stop)
    assert all(s[-1] == tok.eos_token_id for s in spans)
    # labels equal input ids wherever they are not ignored, and placeholders are ignored
    ids, lab = np.array(enc.input_ids), np.array(enc.labels)
    keep = lab != IGNORE_INDEX
    assert (lab[keep] == ids[keep]).all()
    assert (ids == IMG).sum() == 3 and (lab[ids == IMG] == IGNORE_INDEX).all()
    assert list(ids[enc.image_start:enc.image_start + 3]) == [IMG] * 3


def test_hf_chat_matches_full_rendering(tok):
    """Segment-wise ids equal tokenising the whole rendered conversation (no tokenisation mismatch)."""
    enc = get_template("hf_chat").encode(CONV, tok, image_token_id=IMG, num_image_tokens=1)
    msgs = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in CONV]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert enc.input_ids == tok(full, add_special_tokens=False)["input_ids"]


def test_plain_template(tok):
    enc = get_template("plain").encode(caption_conversation("a red star on the left"), tok,
                                       image_token_id=IMG, num_image_tokens=4)
    pre = tok("Image:", add_special_tokens=False)["input_ids"]  # the tiny tokenizer adds no BOS: text prefix
    k = len(pre)
    assert enc.input_ids[:k + 4] == pre + [IMG] * 4 and enc.image_start == k
    assert tok.decode(target_spans(enc.labels)[0], skip_special_tokens=True) == "a red star on the left"
    assert enc.labels[:k + 4] == [IGNORE_INDEX] * (k + 4)
    gen = get_template("plain").encode(caption_conversation("x")[:1], tok, image_token_id=IMG,
                                       num_image_tokens=4, for_generation=True)
    assert gen.input_ids == pre + [IMG] * 4
    legacy = get_template("plain", image_prefix="legacy").encode(caption_conversation("x")[:1], tok,
                                                                  image_token_id=IMG, num_image_tokens=4,
                                                                  for_generation=True)
    assert legacy.input_ids == [IMG] * 4  # old exports: the tiny tokenizer prepends no BOS


def test_generation_prompt_is_training_prefix(tok):
    for name in TEMPLATES:
        conv = caption_conversation("a blue circle", "Describe it.")
        full = get_template(name).encode(conv, tok, image_token_id=IMG, num_image_tokens=2)
        prompt = get_template(name).encode(conv[:1], tok, image_token_id=IMG, num_image_tokens=2, for_generation=True)
        assert full.input_ids[:len(prompt.input_ids)] == prompt.input_ids, name
        assert all(x == IGNORE_INDEX for x in full.labels[:len(prompt.input_ids)]), name


@pytest.mark.parametrize("conv,msg", [
    ([{"role": "user", "content": "no image"}, {"role": "assistant", "content": "x"}], "exactly one"),
    ([{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}], "exactly one"),
    ([{"role": "user", "content": "<image>"}, {"role": "user", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "<image>"}], "must end with an assistant"),
    ([{"role": "robot", "content": "<image>"}], "unknown role"),
])
def test_bad_conversations_raise(tok, conv, msg):
    with pytest.raises(TemplateError, match=msg):
        get_template("vicuna_v1").encode(conv, tok, image_token_id=IMG, num_image_tokens=1)


def test_truncation_after_placeholders_never_inside(tok):
    conv = caption_conversation("x" * 50, "y" * 20)
    tpl = get_template("hf_chat")
    full = tpl.encode(conv, tok, image_token_id=IMG, num_image_tokens=5)
    cut = tpl.encode(conv, tok, image_token_id=IMG, num_image_tokens=5, max_length=len(full.input_ids) - 10)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 10
    assert cut.input_ids == full.input_ids[:len(cut.input_ids)]
    assert cut.input_ids.count(IMG) == 5
    # a limit inside the placeholder run is refused, not cut
    start = full.image_start
    with pytest.raises(TemplateError, match="placeholder"):
        tpl.encode(conv, tok, image_token_id=IMG, num_image_tokens=5, max_length=start + 3)
    # a limit that keeps the placeholders but no answer token is refused too
    with pytest.raises(TemplateError, match="no target token"):
        tpl.encode(conv, tok, image_token_id=IMG, num_image_tokens=5, max_length=start + 5 + 3)


def test_image_marker_in_answer_is_refused(tok):
    with pytest.raises(TemplateError, match="exactly one"):
        get_template("plain").encode(
            caption_conversation("<image> sneaky"), tok, image_token_id=IMG, num_image_tokens=1
        )
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}]
    with pytest.raises(TemplateError, match="user or system"):
        get_template("vicuna_v1").encode(conv, tok, image_token_id=IMG, num_image_tokens=1)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_collator_masks_from_lengths(pad_is_eos):
    tok = build_tiny_tokenizer(pad_is_eos=pad_is_eos)
    tpl = get_template("plain")
    exs = []
    for cap in ["ab", "a much longer caption"]:
        enc = tpl.encode(caption_conversation(cap), tok, image_token_id=IMG, num_image_tokens=1)
        exs.append({"key": cap, "input_ids": enc.input_ids, "labels": enc.labels, "emb": np.ones((1, 4), np.float32),
                    "truncated": False, "reference": cap})
    for side in ("right", "left"):
        b = Collator(tok.pad_token_id, padding_side=side)(exs)
        lens = [len(e["input_ids"]) for e in exs]
        assert b["attention_mask"].sum(1).tolist() == lens  # EOS targets stay unmasked even when pad == EOS
        row = b["input_ids"][0]
        real = row[b["attention_mask"][0].bool()].tolist()
        assert real == exs[0]["input_ids"]
        assert (b["labels"][0][~b["attention_mask"][0].bool()] == IGNORE_INDEX).all()
        assert b["emb"].shape == (2, 1, 4) and b["emb"].dtype == torch.float32
