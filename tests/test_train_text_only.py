"""Stage 2 text-only conversations: loading, rejects, mixed batches, EmbeddingLM with has_image."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anisogen.train.data import (
    Collator, EmbeddingStore, EmbeddingTransform, ExampleBuilder, RejectLog, SampleError, StreamSpec, epoch_batches,
    eval_batches, image_rows, make_loader, train_pipeline,
)
from anisogen.train.lm import load_lm
from anisogen.train.model import EmbeddingLM, PlaceholderMismatch
from anisogen.train.projector import build_projector
from anisogen.train.synthetic import make_items, write_conversations, write_npy
from anisogen.train.templates import IGNORE_INDEX, TemplateError, get_template

torch.set_num_threads(1)
D = 16
K = 2  # placeholder tokens per sample (projector expand2)


@pytest.fixture(scope="module")
def lm_tok():
    lm, tok, _ = load_lm("tiny")
    lm.eval()
    return lm, tok


@pytest.fixture(scope="module")
def img(lm_tok):
    return lm_tok[1].convert_tokens_to_ids("<image>")


def builder(tok, img, template="vicuna_v1", max_length=512):
    return ExampleBuilder(tok, get_template(template), EmbeddingTransform(True, 0.0), img, K, D, 1, max_length)


@pytest.fixture()
def mixed(tmp_path):
    """12 image conversations + 4 text-only (synthetic) + extra lines: null image, image without marker,
    and a marker without an image (rejected)."""
    items = make_items(12, d=D, seed=3)
    write_npy(tmp_path / "emb.npy", items)
    path = tmp_path / "conv.jsonl"
    write_conversations(path, items, ref="index", text_only=4)
    extra = [
        {"id": "null", "image": None, "messages": [{"role": "user", "content": "Say hi."},
                                                   {"role": "assistant", "content": "hi"}]},
        {"id": "nomarker", "image": 5, "conversations": [{"from": "human", "value": "Colour?"},
                                                         {"from": "gpt", "value": "red"}]},
        {"id": "bad", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                        {"from": "gpt", "value": "a star"}]},
    ]
    with open(path, "a") as f:
        for rec in extra:
            f.write(json.dumps(rec) + "\n")
    return path, EmbeddingStore(str(tmp_path / "emb.npy"))


def test_synthetic_text_only_records_are_interleaved(tmp_path):
    items = make_items(8, d=D)
    write_conversations(tmp_path / "c.jsonl", items, text_only=3)
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["t0", "q0", "q1", "q2", "t1", "q3", "q4", "q5", "t2", "q6", "q7"]
    assert all("image" not in r and "<image>" not in r["conversations"][0]["value"] for r in recs if r["id"][0] == "t")
    write_conversations(tmp_path / "d.jsonl", items[:2], text_only=5)  # more text-only than items
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 7


def test_load_mixed_jsonl_counts_and_rejects(tmp_path, mixed):
    path, store = mixed
    log = RejectLog("skip", str(tmp_path / "rej"), tag="load")
    spec = StreamSpec.from_jsonl(str(path), store, log)
    by_key = {r["key"]: r for r in spec.records}
    assert spec.num_samples == 18 and spec.extra["text_only"] == 5 and log.total == 1
    assert sorted(k for k, r in by_key.items() if r["image"] is None) == ["null", "t0", "t1", "t2", "t3"]
    assert all(r["image"] is None or isinstance(r["image"], int) for r in spec.records)
    # an image reference without a marker still gets one in front of the first user message
    assert by_key["nomarker"]["conversation"][0]["content"] == "<image>\nColour?"
    assert all("<image>" not in m["content"] for m in by_key["t1"]["conversation"])
    lines = [json.loads(x) for f in (tmp_path / "rej").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert len(lines) == 1
    assert lines[0]["key"] == "bad" and lines[0]["source"] == f"{path}:19"
    assert lines[0]["reason"] == ("the conversation has an <image> marker but the record has no 'image' "
                                  "(the embedding reference)")
    with pytest.raises(SampleError, match=r"record 'bad' in .*conv.jsonl:19: the conversation has an <image> marker"):
        StreamSpec.from_jsonl(str(path), store, RejectLog("fail"))


def _check_batch(b, spec, img):
    text_keys = {r["key"] for r in spec.records if r["image"] is None}
    want = torch.tensor([k not in text_keys for k in b["keys"]])
    assert b["has_image"].dtype == torch.bool and torch.equal(b["has_image"], want)
    counts = (b["input_ids"] == img).sum(1)
    assert torch.equal(counts, want.long() * K)  # text-only rows: no placeholder at all
    assert (b["emb"][~want] == 0).all() and b["emb"].shape[1:] == (1, D)
    assert torch.allclose(b["emb"][want].norm(dim=-1), torch.ones(1))  # image rows: L2-normalised
    assert ((b["labels"] != IGNORE_INDEX).sum(1) > 0).all()


def test_eval_and_train_batches_mix_both_kinds(tmp_path, mixed, lm_tok, img, monkeypatch):
    path, store = mixed
    spec = StreamSpec.from_jsonl(str(path), store, RejectLog("skip"))
    bl = builder(lm_tok[1], img)
    batches = list(eval_batches(spec, bl, batch_size=6))
    assert sum(len(b["keys"]) for b in batches) == 18 and sum(b["n_rejected"] for b in batches) == 0
    assert sum(int((~b["has_image"]).sum()) for b in batches) == 5
    assert any(b["has_image"].any() and not b["has_image"].all() for b in batches)
    for b in batches:
        _check_batch(b, spec, img)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    nb, per_worker = epoch_batches(spec.num_samples, 4, 1, 0)
    train = list(make_loader(train_pipeline(spec, bl, batch_size=4, num_worker_batches=per_worker, seed=0, epoch=0), 0))
    assert len(train) == nb == 5
    for b in train:
        _check_batch(b, spec, img)
    assert sum(int((~b["has_image"]).sum()) for b in train) >= 1


def test_text_only_in_templates(lm_tok, img):
    tok = lm_tok[1]
    conv = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]
    vic = get_template("vicuna_v1")
    with pytest.raises(TemplateError, match="exactly one <image> marker, found 0"):
        vic.encode(conv, tok, image_token_id=img, num_image_tokens=K)
    for name in ("vicuna_v1", "hf_chat"):
        enc = get_template(name).encode(conv, tok, image_token_id=img, num_image_tokens=K, allow_text_only=True)
        assert enc.image_start == -1 and img not in enc.input_ids and enc.num_targets > 0
    full = vic.encode(conv, tok, image_token_id=img, num_image_tokens=K, allow_text_only=True)
    cut = len(full.input_ids) - 2  # text-only truncation has no placeholder run to protect
    short = vic.encode(conv, tok, image_token_id=img, num_image_tokens=K, allow_text_only=True, max_length=cut)
    assert short.truncated and short.input_ids == full.input_ids[:cut] and short.image_start == -1
    two = [{"role": "user", "content": "<image><image>"}, conv[1]]
    with pytest.raises(TemplateError, match="at most one <image> marker, found 2"):
        vic.encode(two, tok, image_token_id=img, num_image_tokens=K, allow_text_only=True)
    with pytest.raises(TemplateError, match="'plain' cannot encode a text-only conversation"):
        get_template("plain").encode(conv, tok, image_token_id=img, num_image_tokens=K, allow_text_only=True)
    # an image conversation is unchanged by allow_text_only
    img_conv = [{"role": "user", "content": "<image>\nSay hi."}, conv[1]]
    a = vic.encode(img_conv, tok, image_token_id=img, num_image_tokens=K)
    assert a == vic.encode(img_conv, tok, image_token_id=img, num_image_tokens=K, allow_text_only=True)


def test_plain_template_rejects_text_only_records(mixed, lm_tok, img):
    path, store = mixed
    spec = StreamSpec.from_jsonl(str(path), store, RejectLog("skip"))
    spec.records = [r for r in spec.records if r["image"] is None]
    with pytest.raises(SampleError, match="'plain' cannot encode a text-only conversation"):
        list(eval_batches(spec, builder(lm_tok[1], img, template="plain"), batch_size=4, on_error="fail"))


def _model(lm_tok, img, seed=0):
    torch.manual_seed(seed)
    return EmbeddingLM(lm_tok[0], build_projector("expand2", D, lm_tok[0].config.hidden_size), img)


def _mixed_batch(lm_tok, img):
    tok = lm_tok[1]
    rng = np.random.default_rng(0)
    convs = [
        [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "Repeat the word: star"}, {"role": "assistant", "content": "star"}],
        [{"role": "user", "content": "<image>\nShape and place, please?"},
         {"role": "assistant", "content": "a heart, left"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello to you too"}],
    ]
    bl = builder(tok, img)
    exs = [bl.build({"key": str(i), "conversation": c},
                    None if i % 2 else rng.standard_normal((1, D)).astype(np.float32),
                    train=False, rng=None) for i, c in enumerate(convs)]
    return Collator(tok.pad_token_id)(exs)


def _row_ce(logits, labels):
    lab = labels[1:]
    return F.cross_entropy(logits[:-1].float(), lab, ignore_index=IGNORE_INDEX, reduction="sum"), int(
        (lab != -100).sum()
    )


def test_mixed_batch_loss_is_the_sum_of_row_losses(lm_tok, img):
    m = _model(lm_tok, img)
    b = _mixed_batch(lm_tok, img)
    assert b["has_image"].tolist() == [True, False, True, False]
    with torch.no_grad():
        ls, n = m(b["input_ids"], b["attention_mask"], b["emb"], b["labels"], has_image=b["has_image"])
        total, count = 0.0, 0
        for i in range(4):
            L = int(b["attention_mask"][i].sum())
            ids, labels = b["input_ids"][i:i + 1, :L], b["labels"][i, :L]
            if b["has_image"][i]:  # image row alone, strict path (has_image=None)
                logits = m(ids, torch.ones_like(ids), b["emb"][i:i + 1]).logits[0]
            else:  # text-only row: the bare LM on its token ids, no embed() at all
                logits = m.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            s, c = _row_ce(logits, labels)
            total += float(s)
            count += c
    assert int(n) == count
    assert float(ls) == pytest.approx(total, rel=1e-5)


def test_projector_gets_gradient_with_and_without_images(lm_tok, img):
    b = _mixed_batch(lm_tok, img)
    m = _model(lm_tok, img)
    ls, _ = m(b["input_ids"], b["attention_mask"], b["emb"], b["labels"], has_image=b["has_image"])
    ls.backward()
    grads = [p.grad for p in m.projector.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    text = image_rows({**b, "has_image": ~b["has_image"]})  # the two text-only rows, as a batch
    assert text["keys"] == ["1", "3"]
    m = _model(lm_tok, img)
    ls, _ = m(text["input_ids"], text["attention_mask"], text["emb"], text["labels"],
              has_image=torch.zeros(2, dtype=torch.bool))
    ls.backward()
    grads = [p.grad for p in m.projector.parameters()]
    assert all(g is not None for g in grads) and all((g == 0).all() for g in grads)
    m.lm.zero_grad(set_to_none=True)


def test_image_rows_selects_image_rows(lm_tok, img):
    b = _mixed_batch(lm_tok, img)
    sub = image_rows(b)
    assert sub["keys"] == ["0", "2"] and sub["has_image"].all() and sub["emb"].shape == (2, 1, D)
    assert sub["input_ids"].shape == (2, b["input_ids"].shape[1]) and sub["n_rejected"] == b["n_rejected"]
    assert image_rows(sub) is sub
    assert image_rows({**b, "has_image": torch.zeros(4, dtype=torch.bool)}) is None


def test_placeholder_checks_with_has_image(lm_tok, img):
    m = _model(lm_tok, img)
    b = _mixed_batch(lm_tok, img)
    with pytest.raises(PlaceholderMismatch, match="row 1 has 0 image placeholder tokens .* 2 visual tokens per sample"):
        m.embed(b["input_ids"], b["emb"])  # strict: has_image=None means every row has an image
    with pytest.raises(
        PlaceholderMismatch, match=r"row 0 is text-only \(has_image False\) but has 2 image placeholder"
    ):
        m.embed(b["input_ids"], b["emb"], torch.tensor([False, False, True, False]))
    with pytest.raises(PlaceholderMismatch, match="row 1 has 0 image placeholder tokens"):
        m.embed(b["input_ids"], b["emb"], torch.ones(4, dtype=torch.bool))
    with pytest.raises(PlaceholderMismatch, match=r"has_image has shape \(3,\), expected \(4,\)"):
        m.embed(b["input_ids"], b["emb"], torch.ones(3, dtype=torch.bool))


def test_visual_mask_hooks_and_generation_on_mixed_batch(lm_tok, img):
    m = _model(lm_tok, img)
    tok = lm_tok[1]
    b = _mixed_batch(lm_tok, img)
    seen = []
    handle = m.register_visual_mask_hook(lambda mask: seen.append(mask.clone()))
    with torch.no_grad():
        m(b["input_ids"], b["attention_mask"], b["emb"], b["labels"], has_image=b["has_image"])
    handle.remove()
    assert seen[0].shape == b["input_ids"].shape and torch.equal(seen[0].sum(1), torch.tensor([K, 0, K, 0]))
    prompts = [[{"role": "user", "content": "<image>\nWhat colour?"}], [{"role": "user", "content": "Hi"}]]
    vic = get_template("vicuna_v1")
    exs = []
    for c in prompts:
        enc = vic.encode(c, tok, image_token_id=img, num_image_tokens=K, for_generation=True, allow_text_only=True)
        exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels, "truncated": False, "reference": ""})
    pb = Collator(tok.pad_token_id, padding_side="left")(exs)
    has = torch.tensor([True, False])
    emb = torch.randn(2, 1, D)
    a = m.generate(pb["input_ids"], pb["attention_mask"], emb, has_image=has, max_new_tokens=4,
                   pad_token_id=tok.pad_token_id)
    emb2 = emb.clone()
    emb2[1] = torch.randn(1, D)  # the text-only row's embedding is ignored
    c = m.generate(pb["input_ids"], pb["attention_mask"], emb2, has_image=has, max_new_tokens=4,
                   pad_token_id=tok.pad_token_id)
    assert a.shape == (2, 4) and torch.equal(a, c)
