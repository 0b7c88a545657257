"""Chunked cross-entropy (anisogen.train.loss) against the full-logits reference, through EmbeddingLM too."""

import warnings

import pytest
import torch
from torch import nn

from anisogen.train.lm import load_lm
from anisogen.train.loss import (ChunkedLossUnsupported, LogitTransform, chunked_causal_lm_loss_sum,
                                 last_hidden_state, lm_head_parts, logit_transform_for, verify_chunked_head)
from anisogen.train.model import EmbeddingLM, causal_lm_loss_sum
from anisogen.train.projector import build_projector

torch.set_num_threads(1)


def small_llama(tied: bool, vocab: int = 97, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def make_labels(B, T, vocab, seed=0, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) > keep] = -100
    labels[:, 0] = -100
    return labels


def loss_and_grads(fn, tensors):
    for t in tensors:
        t.grad = None
    loss, n = fn()
    loss.backward()
    return loss.detach(), n, [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 13, 10_000])
def test_chunked_equals_full_on_hidden_and_head(tied, chunk):
    lm = small_llama(tied)
    head = lm.get_output_embeddings()
    head.weight.requires_grad_(True)
    torch.manual_seed(1)
    hidden = torch.randn(3, 11, 32, requires_grad=True)
    labels = make_labels(3, 11, 97)  # 3 * 10 shifted positions, ~18 targets: no chunk size divides it evenly
    n_expected = int((labels[:, 1:] != -100).sum())
    assert n_expected % 7 and n_expected % 13
    ref = loss_and_grads(lambda: causal_lm_loss_sum(head(hidden), labels), [hidden, head.weight])
    got = loss_and_grads(lambda: chunked_causal_lm_loss_sum(hidden, head, labels, chunk_tokens=chunk),
                         [hidden, head.weight])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert int(got[1]) == int(ref[1]) == n_expected
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_weight_and_weight_bias_forms_match_module():
    torch.manual_seed(0)
    head = nn.Linear(16, 29, bias=True)
    hidden = torch.randn(2, 9, 16)
    labels = make_labels(2, 9, 29)
    ref, _ = causal_lm_loss_sum(head(hidden), labels)
    a, _ = chunked_causal_lm_loss_sum(hidden, head, labels, chunk_tokens=4)
    b, _ = chunked_causal_lm_loss_sum(hidden, (head.weight, head.bias), labels, chunk_tokens=4)
    c, _ = chunked_causal_lm_loss_sum(hidden, head.weight, labels, chunk_tokens=4)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)
    ref_nobias, _ = causal_lm_loss_sum(hidden @ head.weight.T, labels)
    torch.testing.assert_close(c, ref_nobias)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_causal_lm_loss_sum(hidden, head, labels, chunk_tokens=0)


def test_zero_targets_gives_zero_loss_with_a_graph():
    head = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # a label at position 0 is never a target (nothing predicts it)
    loss, n = chunked_causal_lm_loss_sum(hidden, head, labels, chunk_tokens=4)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    ref, ref_n = causal_lm_loss_sum(head(hidden), labels)
    assert float(ref) == 0.0 and int(ref_n) == 0
    loss.backward()  # every head parameter is in the graph (zero grad), as DDP needs
    assert head.weight.grad is not None and not head.weight.grad.any()
    assert hidden.grad is not None and not hidden.grad.any()


def test_no_grad_mode_and_bf16_hidden_upcast():
    lm = small_llama(False)
    head = lm.get_output_embeddings().to(torch.bfloat16)
    torch.manual_seed(2)
    hidden = torch.randn(2, 8, 32).to(torch.bfloat16)
    labels = make_labels(2, 8, 97)
    with torch.no_grad():
        ref, _ = causal_lm_loss_sum(head(hidden), labels)
        got, _ = chunked_causal_lm_loss_sum(hidden, head, labels, chunk_tokens=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_backward_keeps_no_full_size_logits():
    """Outside the per-chunk checkpoints nothing of vocabulary width is saved for backward."""
    vocab = 500
    head = nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(4, 50, 16, requires_grad=True)
    labels = make_labels(4, 50, vocab, keep=0.9)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss_sum(head(hidden), labels)[0]
    assert max(saved) >= 4 * 49 * vocab  # the reference keeps the full logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_causal_lm_loss_sum(hidden, head, labels, chunk_tokens=16)
    assert max(saved) < 16 * vocab
    loss.backward()


def _elm(lm, vocab, image_id, seed=0):
    torch.manual_seed(seed)
    hidden = lm.get_input_embeddings().weight.shape[1]
    return EmbeddingLM(lm, build_projector("mlp2x_gelu", 8, hidden), image_id)


def _batch(vocab, image_id, B=3, T=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (B, T), generator=g)
    ids[ids == image_id] = image_id + 1 if image_id + 1 < vocab else image_id - 1
    ids[:, 2] = image_id
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -4:] = 0  # right padding on row 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, -4:] = -100
    labels[1, 7] = -100
    emb = torch.randn(B, 8, generator=g)
    return ids, mask, emb, labels


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_lm_chunked_equals_full_all_parameters(tied):
    """``full`` method: every LM parameter (tied head included) and the projector get the same gradients."""
    lm = small_llama(tied)
    m = _elm(lm, 97, image_id=96)
    for p in m.parameters():
        p.requires_grad_(True)
    batch = _batch(97, 96)
    params = [p for p in m.parameters()]
    m.loss_chunk_tokens = 0
    ref = loss_and_grads(lambda: m(*batch), params)
    m.loss_chunk_tokens = 5
    got = loss_and_grads(lambda: m(*batch), params)
    assert int(got[1]) == int(ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_embedding_lm_chunked_equals_full_on_the_tiny_lm():
    lm, tok, _ = load_lm("tiny")
    img = tok.convert_tokens_to_ids("<image>")
    m = _elm(lm, len(tok), img)
    m.freeze_lm()
    ids, mask, emb, labels = _batch(256, img, B=4, T=23, seed=3)
    params = list(m.projector.parameters())
    m.loss_chunk_tokens = 0
    ref = loss_and_grads(lambda: m(ids, mask, emb, labels), params)
    for chunk in (3, 11, 4096):
        m.loss_chunk_tokens = chunk
        got = loss_and_grads(lambda: m(ids, mask, emb, labels), params)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        for g, r in zip(got[2], ref[2]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert EmbeddingLM.loss_chunk_tokens > 0  # chunked by default


def test_peft_lora_including_the_head():
    from peft import LoraConfig, get_peft_model

    base = small_llama(True)
    lm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                         lora_dropout=0.0, init_lora_weights=False))
    parts = lm_head_parts(lm)
    assert parts.decoder is base.model and "lora" in type(parts.head).__module__
    m = _elm(lm, 97, image_id=96)
    batch = _batch(97, 96, seed=4)
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    m.loss_chunk_tokens = 0
    ref = loss_and_grads(lambda: m(*batch), params)
    m.loss_chunk_tokens = 4
    got = loss_and_grads(lambda: m(*batch), params)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_prompt_learning_peft_is_refused():
    from peft import PromptTuningConfig, get_peft_model

    lm = get_peft_model(small_llama(False), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ChunkedLossUnsupported, match="prompt-learning"):
        lm_head_parts(lm)


class _Opaque(nn.Module):
    """A causal LM without get_decoder/get_output_embeddings: forward falls back to full logits."""

    def __init__(self, lm):
        super().__init__()
        self.inner = lm

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, **kw):
        return self.inner(**kw)


def test_embedding_lm_falls_back_with_one_warning():
    lm = small_llama(False)
    m = _elm(_Opaque(lm), 97, image_id=96)
    batch = _batch(97, 96)
    with pytest.warns(UserWarning, match="chunked cross-entropy unavailable"):
        got, _ = m(*batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(*batch)
    m2 = _elm(lm, 97, image_id=96)
    m2.loss_chunk_tokens = 0
    torch.testing.assert_close(got, m2(*batch)[0])


def _check_family(model):
    model.eval()
    with torch.no_grad():  # logits of a few units, so capping/scaling changes the loss a lot
        model.get_output_embeddings().weight.mul_(40)
    parts = lm_head_parts(model)
    assert verify_chunked_head(model, tokens=15, chunk_tokens=4, rtol=1e-5) <= 1e-5
    return parts


def test_logit_transforms_of_gemma2_cohere_granite():
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM)

    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    g = _check_family(Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5,
                                                     attn_implementation="eager")))
    assert g.transform == LogitTransform(scale=1.0, softcap=0.5)  # tiny cap: soft-capping matters here
    c = _check_family(CohereForCausalLM(CohereConfig(**common, logit_scale=3.0)))
    assert c.transform.scale == 3.0
    r = _check_family(GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0)))
    assert r.transform.scale == 0.25
    assert logit_transform_for(small_llama(False).config).is_identity


def test_decoder_hooks_still_fire():
    """Forward hooks on decoder blocks (MoReS, Gap-Init calibration) run on the chunked path."""
    lm = small_llama(False)
    m = _elm(lm, 97, image_id=96)
    calls = []
    handle = lm.model.layers[1].register_forward_hook(lambda mod, inp, out: calls.append(1))
    m(*_batch(97, 96))
    handle.remove()
    assert calls == [1]


def test_last_hidden_state_matches_lm_logits():
    lm = small_llama(True)
    parts = lm_head_parts(lm)
    embeds = torch.randn(2, 6, 32)
    with torch.no_grad():
        hidden = last_hidden_state(parts.decoder, embeds, None)
        torch.testing.assert_close(parts.head(hidden), lm(inputs_embeds=embeds).logits)
