"""EmbeddingLM and projectors: placement of visual tokens, count checks, loss, generation."""

import pytest
import torch
import torch.nn.functional as F

from anisogen.train.lm import load_lm
from anisogen.train.model import EmbeddingLM, PlaceholderMismatch, causal_lm_loss_sum
from anisogen.train.projector import build_projector

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm_tok():
    lm, tok, _ = load_lm("tiny")
    return lm, tok


def test_projector_kinds_shapes_and_llava_keys():
    p = build_projector("mlp2x_gelu", 16, 64)
    assert sorted(p.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert isinstance(p[1], torch.nn.GELU)
    assert p(torch.randn(3, 16)).shape == (3, 1, 64)
    assert p(torch.randn(3, 2, 16)).shape == (3, 2, 64)
    assert len([m for m in build_projector("mlp3x_gelu", 16, 64) if isinstance(m, torch.nn.Linear)]) == 3
    e = build_projector("expand4", 16, 64)
    out = e(torch.randn(3, 16))
    assert out.shape == (3, 4, 64)
    # token j of expand{k} is the j-th d_out-slice of the single Linear's output
    x = torch.randn(1, 16)
    assert torch.allclose(e(x)[0, 2], (e[0](x))[0, 128:192])
    assert build_projector("linear", 16, 64)(torch.randn(2, 16)).shape == (2, 1, 64)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp", 16, 64)
    with pytest.raises(ValueError, match="does not match the projector input dimension 16"):
        p(torch.randn(3, 8))


def test_embed_places_projected_features_at_placeholders(lm_tok):
    lm, tok = lm_tok
    img = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    m = EmbeddingLM(lm, build_projector("expand3", 8, 64), img)
    ids = torch.tensor([[10, img, img, img, 11, 12], [img, img, img, 13, 14, 15]])
    emb = torch.randn(2, 8)
    out = m.embed(ids, emb)
    feats = m.projector(emb)
    table = lm.get_input_embeddings().weight
    assert torch.equal(out[0, 1:4], feats[0])
    assert torch.equal(out[1, 0:3], feats[1])
    assert torch.equal(out[0, 0], table[10]) and torch.equal(out[1, 5], table[15])


def test_placeholder_count_mismatch_raises(lm_tok):
    lm, tok = lm_tok
    img = tok.convert_tokens_to_ids("<image>")
    m = EmbeddingLM(lm, build_projector("linear", 8, 64), img)
    ids = torch.tensor([[img, 10, 11], [img, img, 12]])
    with pytest.raises(PlaceholderMismatch, match="row 1 has 2 image placeholder tokens"):
        m.embed(ids, torch.randn(2, 8))
    with pytest.raises(PlaceholderMismatch, match="3 embeddings for a batch of 2"):
        m.embed(ids[:1].repeat(2, 1), torch.randn(3, 8))


def test_loss_sum_counts_only_targets(lm_tok):
    lm, tok = lm_tok
    img = tok.convert_tokens_to_ids("<image>")
    m = EmbeddingLM(lm, build_projector("linear", 8, 64), img)
    ids = torch.tensor([[img, 20, 21, 22, 0], [img, 30, 31, 32, 33]])
    labels = torch.tensor([[-100, -100, 21, 22, -100], [-100, 30, 31, 32, 33]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    emb = torch.randn(2, 8)
    ls, n = m(ids, mask, emb, labels)
    logits = m(ids, mask, emb).logits
    manual, cnt = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != -100:
                manual += F.cross_entropy(logits[b, t - 1][None], labels[b, t][None]).item()
                cnt += 1
    assert int(n) == cnt == 6
    assert abs(ls.item() - manual) < 1e-4
    assert causal_lm_loss_sum(logits, labels)[0].item() == pytest.approx(ls.item())


def test_generation_is_conditioned_on_embedding(lm_tok):
    lm, tok = lm_tok
    img = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(1)
    m = EmbeddingLM(lm, build_projector("expand4", 8, 64), img)
    with torch.no_grad():
        m.projector[0].weight.mul_(50)  # make the prefix dominate the random LM
    ids = torch.tensor([[img] * 4] * 2)
    emb = torch.randn(2, 8)
    a = m.generate(ids, torch.ones_like(ids), emb, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    b = m.generate(ids, torch.ones_like(ids), emb, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert a.shape == (2, 6) and torch.equal(a, b)  # greedy is deterministic
    c = m.generate(ids, torch.ones_like(ids), emb.flip(0), max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert torch.equal(c, a.flip(0))  # rows follow their own embedding
    assert not torch.equal(a[0], a[1])
    # greedy generation equals argmax decoding through the same forward path
    x = ids[:1]
    seq = []
    for _ in range(3):
        logits = m(x, torch.ones_like(x), emb[:1]).logits
        nxt = logits[0, -1].argmax()
        seq.append(int(nxt))
        x = torch.cat([x, nxt.view(1, 1)], 1)
    assert a[0, :3].tolist() == seq
