"""Trimmed, bucketed text encoding == open_clip encode_text on context-padded input; exact tokenisation."""

import numpy as np
import open_clip
import pytest
import torch

import anisogen  # noqa: F401  (registers the toy config)
from anisogen.encode.text import (
    ClipTokenizer, EncodeStats, TextEncoder, bucket_batches, iter_tokenized, reference_encode, token_lengths,
)

torch.set_num_threads(1)

WORDS = ("a photo of the red cube next to blue sphere on green background with small large tiny many "
         "objects 3 dogs! it's what's cafe").split()


def _texts(n, seed=0, max_words=40):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, max_words))) for _ in range(n)]


TRICKY = [
    "", " ", "Hello &amp; world", "tab\tand\nnewline", "ctrl\x0bchar", "unit\x1fsep", "del\x7fchar",
    "Café “quoted” ﬁne", "ÅNGSTRÖM", "emoji 🙂 ok", "ＦＵＬＬＷＩＤＴＨ", "mojibake cafÃ©", "&lt;b&gt;bold&lt;/b&gt;",
    "CamelCase MixedCASE", "x" * 500, " ".join(["word"] * 120), "\r\nwindows\r\nlines", "nbsp\u00a0space",
    "zero\u200bwidth", "line\u2028sep",
]


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = open_clip.create_model("toy", pretrained=None).eval()
    return model, open_clip.get_tokenizer("toy")


def test_tokenizer_matches_open_clip_exactly(toy):
    _, tok = toy
    fast = ClipTokenizer(tok)
    assert fast.exact_fast
    texts = _texts(300, seed=1) + TRICKY
    got = fast(texts)
    ref = tok(texts).numpy()
    np.testing.assert_array_equal(got.ids, ref)
    np.testing.assert_array_equal(got.lengths, token_lengths(ref))
    # truncation flag from the untruncated BPE length, independent of the fast path
    full = np.array([len(tok.encode(t)) + 2 for t in texts])
    np.testing.assert_array_equal(got.truncated, full > tok.context_length)
    assert got.truncated.sum() >= 2  # the long texts above


def test_length_is_eot_position_not_nonzero_count(toy):
    model, tok = toy
    texts = ["wow !; great !$ a !#%", "a"]  # '!;' tokenises to [0, 282]: id 0 is a real token
    ids = tok(texts).numpy()
    lengths = token_lengths(ids)
    assert (ids[0, 1 : lengths[0] - 1] == 0).sum() == 3
    assert np.count_nonzero(ids[0]) == lengths[0] - 3  # counting non-zeros would cut 3 real tokens
    assert ids[0, lengths[0] - 1] == tok.eot_token_id and ids[1, lengths[1] - 1] == tok.eot_token_id
    np.testing.assert_array_equal(ClipTokenizer(tok)(texts).lengths, lengths)
    enc = TextEncoder(model, tok, device="cpu", normalize=False)
    assert np.abs(enc.encode(texts) - reference_encode(model, tok, texts)).max() <= 1e-5


@pytest.mark.parametrize("batch_size,window", [(7, None), (64, 50), (1000, None)])
def test_trimmed_equals_padded_encode_text(toy, batch_size, window):
    model, tok = toy
    texts = _texts(150, seed=2) + TRICKY
    enc = TextEncoder(model, tok, device="cpu", batch_size=batch_size, bucket_window=window, normalize=False)
    assert enc.trimmed
    got = enc.encode(texts)
    ref = reference_encode(model, tok, texts, batch_size=64)
    assert got.shape == ref.shape == (len(texts), model.text_projection.shape[1])
    assert np.abs(got - ref).max() <= 1e-5
    # trimming really happened: most batches are far shorter than the context
    stats = EncodeStats()
    enc.encode_tokenized(enc.tokenize(texts), stats)
    assert stats.tokens < 0.6 * stats.padded_tokens


def test_vit_b32_sized_tower_equivalence():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    texts = _texts(40, seed=3) + TRICKY[:8]
    got = TextEncoder(model, tok, device="cpu", batch_size=16, normalize=False).encode(texts)
    ref = reference_encode(model, tok, texts, batch_size=48)
    assert np.abs(got - ref).max() <= 1e-5


def test_normalized_output_and_input_order(toy):
    model, tok = toy
    texts = _texts(60, seed=4)
    enc = TextEncoder(model, tok, device="cpu", batch_size=8)
    out = enc.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # order restored: encoding a permutation permutes the rows
    perm = np.random.default_rng(0).permutation(len(texts))
    out_p = enc.encode([texts[i] for i in perm])
    assert np.abs(out_p - out[perm]).max() < 1e-5


def test_dataloader_workers_give_same_result(toy):
    model, tok = toy
    texts = _texts(90, seed=5)
    enc = TextEncoder(model, tok, device="cpu", batch_size=16)
    a = enc.encode(texts, num_workers=0, chunk_size=25)
    b = enc.encode(texts, num_workers=2, chunk_size=25)
    np.testing.assert_array_equal(a, b)
    chunks = list(iter_tokenized(texts, enc.tokenizer, 25, num_workers=2))
    assert [len(t) for t, _ in chunks] == [25, 25, 25, 15]


def test_bucket_batches_partition_and_sorting():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 77, size=103)
    batches = bucket_batches(lengths, 10, window=40)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(103))
    assert all(len(b) <= 10 for b in batches)
    for b in batches:  # every batch stays inside one window and is length-sorted (descending)
        assert len({int(i) // 40 for i in b}) == 1
        assert np.all(np.diff(lengths[b]) <= 0)
    assert [b.tolist() for b in bucket_batches(lengths, 10, window=40)] == [b.tolist() for b in batches]
    with pytest.raises(ValueError):
        bucket_batches(lengths, 0)


def test_untrimmable_tower_falls_back_to_full_context(toy):
    model, tok = toy
    enc = TextEncoder(model, tok, device="cpu", trim=False, normalize=False)
    assert not enc.trimmed
    texts = _texts(20, seed=6)
    assert np.abs(enc.encode(texts) - reference_encode(model, tok, texts)).max() <= 1e-6
