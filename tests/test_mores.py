"""MoReS: LoReFT-form steering interventions on decoder-block outputs at selected visual positions."""

import pytest
import torch
from torch import nn

from anisogen.train.model import EmbeddingLM
from anisogen.train.methods.mores import (
    MoReS, SteeringIntervention, lora_parameter_count, mores_parameter_count, parameter_summary,
    select_positions,
)
from anisogen.train.projector import build_projector

torch.set_num_threads(1)  # the CI box has 2 shared cores; intra-op threads only add contention here
H = 32
IMG = 250


def tiny_llama(layers=2, seed=0, kv_heads=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=H, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attn_implementation="eager", tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class TensorLayer(nn.Module):
    """A decoder-layer stand-in returning a bare tensor (transformers 5 style)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class TupleLayer(TensorLayer):
    """Returns (hidden, extra) like older transformers decoder layers."""

    def forward(self, x):
        return torch.tanh(self.lin(x)), torch.ones(1)


def _interventions_differ_from_identity(m: MoReS):
    with torch.no_grad():
        for iv in m.interventions.values():
            iv.proj.weight.normal_(0, 0.5)
            iv.proj.bias.normal_(0, 0.5)


def test_parameter_count_equals_formula():
    for L, r in ((2, 1), (3, 2), (1, 4)):
        m = MoReS(H, L, rank=r)
        assert m.num_parameters() == mores_parameter_count(L, H, r) == L * r * (2 * H + 1)
        assert MoReS(H, L, rank=r, trivialization=True).num_parameters() == L * r * (2 * H + 1)
    # paper figures: Phi-2 (D=2560, 32 layers, r=1) -> 163,872; Vicuna-7B -> 262,176
    assert mores_parameter_count(32, 2560, 1) == 163_872
    assert mores_parameter_count(32, 4096, 1) == 262_176
    lm = tiny_llama()
    for p in lm.parameters():
        p.requires_grad_(False)
    m = MoReS(H, 2).attach(lm)
    trainable = sum(p.numel() for p in list(lm.parameters()) + list(m.parameters()) if p.requires_grad)
    assert trainable == 2 * (2 * H + 1)
    summary = parameter_summary(lm, m, lora_r=8)
    # LoRA r=8 on q,k,v,o of 2 layers with H=32: 8 * (32+32) * 4 * 2
    assert summary["lora"] == lora_parameter_count(lm, 8, ("q_proj", "k_proj", "v_proj", "o_proj")) == 8 * 64 * 4 * 2
    assert summary["mores"] == summary["mores_formula"] == 130


def test_intervention_formula_and_orthonormal_rows():
    torch.manual_seed(0)
    iv = SteeringIntervention(H, 3, dropout=0.0)
    R = iv.R.detach()
    assert R.shape == (3, H) and R.dtype == torch.float32
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-5)
    h = torch.randn(5, H)
    want = h + (h @ iv.proj.weight.T + iv.proj.bias - h @ R.T) @ R
    assert torch.allclose(iv(h), want, atol=1e-5)
    hb = h.to(torch.bfloat16)
    assert iv(hb).dtype == torch.bfloat16


def test_identity_init_option():
    torch.manual_seed(0)
    h = torch.randn(4, 7, H)
    iv = SteeringIntervention(H, 2, init_identity=True).eval()
    assert torch.allclose(iv(h), h, atol=1e-5)
    assert not torch.allclose(SteeringIntervention(H, 2).eval()(h), h, atol=1e-3)  # paper init: random W
    # train mode: dropout on the delta keeps the identity, the faithful placement drops entries of h + delta
    delta_only = SteeringIntervention(H, 2, init_identity=True, dropout=0.5, dropout_on="delta").train()
    assert torch.allclose(delta_only(h), h, atol=1e-5)
    faithful = SteeringIntervention(H, 2, init_identity=True, dropout=0.5, dropout_on="output").train()
    out = faithful(h)
    assert (out == 0).any()
    kept = out != 0
    assert torch.allclose(out[kept], 2 * h[kept], atol=1e-5)


@pytest.mark.parametrize("layer_cls", [TensorLayer, TupleLayer])
def test_tensor_and_tuple_layer_outputs_and_unmasked_positions(layer_cls):
    torch.manual_seed(0)
    layers = nn.ModuleList([layer_cls(), layer_cls()])
    x = torch.randn(2, 6, H)
    plain = [layers[0](x)]
    m = MoReS(H, 2, dropout=0.0).attach(layers)
    _interventions_differ_from_identity(m)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[0, 2] = mask[1, 4] = True
    m.set_mask(mask)
    out = layers[0](x)
    base = plain[0][0] if isinstance(plain[0], tuple) else plain[0]
    if layer_cls is TupleLayer:
        assert isinstance(out, tuple) and len(out) == 2 and torch.equal(out[1], torch.ones(1))
        out = out[0]
    assert torch.equal(out[~mask], base[~mask])  # positions outside the mask: bit-identical
    want = m.interventions["0"](base[mask])
    assert torch.allclose(out[mask], want, atol=1e-6)
    assert not torch.allclose(out[mask], base[mask], atol=1e-3)
    # KV-cache decode step: sequence length differs from the mask -> untouched
    step = torch.randn(2, 1, H)
    o1 = layers[1](step)
    m.set_mask(None)
    o2 = layers[1](step)
    o1 = o1[0] if isinstance(o1, tuple) else o1
    o2 = o2[0] if isinstance(o2, tuple) else o2
    assert torch.equal(o1, o2)
    m.detach()
    assert not layers[0]._forward_hooks


def test_full_model_steering_is_causal_and_local():
    lm = tiny_llama()
    m = MoReS(H, 2, dropout=0.0, positions="all").attach(lm)
    _interventions_differ_from_identity(m)
    torch.manual_seed(2)
    x = torch.randn(1, 8, H)
    with torch.no_grad():
        m.set_mask(None)
        ref = lm(inputs_embeds=x).logits
        vis = torch.zeros(1, 8, dtype=torch.bool)
        vis[0, 3] = True
        with m.steer(vis):
            got = lm(inputs_embeds=x).logits
        assert m._mask is None  # context restored
    assert torch.equal(got[0, :3], ref[0, :3])  # before the steered position: identical (causal)
    assert not torch.allclose(got[0, 3:], ref[0, 3:], atol=1e-4)


def test_generation_with_cache_steers_only_the_prompt_pass():
    lm = tiny_llama()
    m = MoReS(H, 2, dropout=0.0, positions="all").attach(lm)
    _interventions_differ_from_identity(m)
    torch.manual_seed(5)
    x = torch.randn(1, 6, H)
    vis = torch.zeros(1, 6, dtype=torch.bool)
    vis[0, 1] = True
    calls = []
    h = lm.model.layers[0].register_forward_hook(lambda mod, a, o: calls.append(o.shape[1]))
    with torch.no_grad(), m.steer(vis):
        out = lm.generate(inputs_embeds=x, attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=3,
                          do_sample=False, pad_token_id=0)
    h.remove()
    assert calls[0] == 6 and all(c == 1 for c in calls[1:])
    # reference without cache: full re-encoding with the same mask padded for the new tokens
    with torch.no_grad():
        seq = x
        toks = []
        for _ in range(3):
            mask = torch.zeros(1, seq.shape[1], dtype=torch.bool)
            mask[0, 1] = True
            m.set_mask(mask)
            nxt = lm(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax()
            toks.append(int(nxt))
            seq = torch.cat([seq, lm.get_input_embeddings()(nxt.view(1, 1))], dim=1)
    assert out[0, -3:].tolist() == toks


def test_rrt_identity_after_optimisation():
    lm = tiny_llama()
    for p in lm.parameters():
        p.requires_grad_(False)
    m = MoReS(H, 2, rank=2, dropout=0.0, positions="all").attach(lm)
    rot, lin = m.param_groups()
    opt = torch.optim.Adam([{"params": rot, "weight_decay": 0.0}, {"params": lin}], lr=0.05)
    torch.manual_seed(0)
    x = torch.randn(2, 5, H)
    vis = torch.ones(2, 5, dtype=torch.bool)
    target = torch.randint(0, 256, (2, 5))
    R0 = {k: iv.R.detach().clone() for k, iv in m.interventions.items()}
    losses = []
    for _ in range(10):
        with m.steer(vis):
            logits = lm(inputs_embeds=x).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for k, iv in m.interventions.items():
        R = iv.R.detach()
        assert not torch.allclose(R, R0[k], atol=1e-3)  # R moved
        assert torch.allclose(R @ R.T, torch.eye(2), atol=1e-5)  # and stays orthonormal


def test_select_positions_policies_and_padding_side():
    vm_r = torch.zeros(2, 12, dtype=torch.bool)
    vm_r[0, 1:9] = True  # 8 visual tokens, right padded row
    vm_r[1, 1:4] = True  # 3 visual tokens
    vm_l = torch.zeros(2, 14, dtype=torch.bool)
    vm_l[0, 4:12] = True  # same rows, left padded with different offsets
    vm_l[1, 10:13] = True

    def ranks(sel, vm):
        return [[int(j) for j in (torch.cumsum(vm[b].long(), 0) - 1)[sel[b]]] for b in range(vm.shape[0])]

    for pol in ("all", "ratio:0.01", "ratio:0.5", "f2+l1", "f1", "l2", "uniform3"):
        sr, sl = select_positions(vm_r, pol), select_positions(vm_l, pol)
        assert not (sr & ~vm_r).any() and not (sl & ~vm_l).any()
        assert ranks(sr, vm_r) == ranks(sl, vm_l), pol
    assert ranks(select_positions(vm_r, "ratio:0.01"), vm_r) == [[3], [1]]  # >= 1 token, middle one
    assert ranks(select_positions(vm_r, "ratio:0.5"), vm_r) == [[0, 2, 5, 7], [0, 2]]
    assert ranks(select_positions(vm_r, "f2+l1"), vm_r) == [[0, 1, 7], [0, 1, 2]]
    assert ranks(select_positions(vm_r, "uniform3"), vm_r) == [[0, 4, 7], [0, 1, 2]]
    assert select_positions(vm_r, "all").sum() == 11
    empty = torch.zeros(1, 5, dtype=torch.bool)
    assert select_positions(empty, "ratio:0.01").sum() == 0
    for bad in ("ratio:2", "half", "ratio:x", "uniform0"):
        with pytest.raises(ValueError):
            select_positions(vm_r, bad)


def test_save_load_materialised_weights(tmp_path):
    torch.manual_seed(0)
    m = MoReS(H, 3, rank=2, layers=[0, 2], positions="f1+l1")
    _interventions_differ_from_identity(m)
    with torch.no_grad():  # move R away from its init (assignment goes through the parametrization)
        for iv in m.interventions.values():
            q, _ = torch.linalg.qr(torch.randn(H, 2))
            iv.rotate.weight = q.T.contiguous()
            assert torch.allclose(iv.R, q.T, atol=1e-5)
    path = m.save(tmp_path / "steering.safetensors")
    m2 = MoReS.load(path)
    assert m2.config == m.config
    s1, s2 = m.steering_state(), m2.steering_state()
    assert s1.keys() == s2.keys() == {"0.R", "0.W", "0.b", "2.R", "2.W", "2.b"}
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-6), k
    h = torch.randn(4, H)
    m.eval(), m2.eval()
    assert torch.allclose(m.interventions["2"](h), m2.interventions["2"](h), atol=1e-5)
    bad = dict(s1)
    bad["0.R"] = torch.ones_like(bad["0.R"])
    with pytest.raises(ValueError, match="orthonormal"):
        m2.load_steering_state(bad)


def test_embedding_lm_binding_and_registered_method(tmp_path):
    from anisogen.train.methods import MethodContext, get_method, parse_options

    class Cfg:
        freeze_projector = False

    lm = tiny_llama()
    torch.manual_seed(1)
    elm = EmbeddingLM(lm, build_projector("expand4", 8, H), IMG, 1)
    method = get_method("mores")
    opts = parse_options(method, ["positions=f1+l1", "dropout=0.0"])
    logs = []
    ctx = MethodContext(
        model=elm, tokenizer=None, config=Cfg(), options=opts, device=torch.device("cpu"), log=logs.append
    )
    setup = method.prepare(ctx)
    assert [g.name for g in setup.groups] == ["projector", "steering_rotation", "steering_linear"]
    assert setup.groups[1].weight_decay == 0.0
    n_steer = sum(p.numel() for g in setup.groups[1:] for p in g.params)
    assert n_steer == setup.info["parameter_counts"]["mores"] == 2 * (2 * H + 1)
    assert any("mores: 130 trainable" in s and "LoRA" in s for s in logs)
    assert all(not p.requires_grad for p in elm.lm.parameters())
    mores = elm.extras["mores"]
    _interventions_differ_from_identity(mores)
    ids = torch.tensor([[1, 5, IMG, IMG, IMG, IMG, 7, 8], [0, 1, IMG, IMG, IMG, IMG, 9, 9]])
    am = torch.tensor([[1] * 8, [0] + [1] * 7])
    emb = torch.randn(2, 1, 8)
    seen = []
    hk = elm.lm.model.layers[0].register_forward_hook(lambda mod, a, o: seen.append(mores._mask.clone()))
    with torch.no_grad():
        out = elm(ids, am, emb).logits
    hk.remove()
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[:, 2] = want[:, 5] = True  # first and last of the 4 placeholders
    assert torch.equal(seen[0], want)
    # the same model without steering differs only from the first steered position on
    mores.set_mask(None)
    with torch.no_grad():
        inp = EmbeddingLM.embed(elm, ids, emb)
        mores.set_mask(None)
        ref = elm.lm(inputs_embeds=inp, attention_mask=am).logits
    # (row 1 position 0 is left padding, whose fully-masked query row is meaningless)
    assert torch.allclose(out[0, :2], ref[0, :2], atol=1e-6) and torch.allclose(out[1, 1], ref[1, 1], atol=1e-6)
    assert not torch.allclose(out[:, 2:], ref[:, 2:], atol=1e-4)
    # export / load hooks round trip through steering.safetensors
    method.export(elm, tmp_path, setup.info)
    lm2 = tiny_llama()
    torch.manual_seed(1)
    elm2 = EmbeddingLM(lm2, build_projector("expand4", 8, H), IMG, 1)
    elm2.projector.load_state_dict(elm.projector.state_dict())
    method.load(elm2, tmp_path, {})
    with torch.no_grad():
        out2 = elm2(ids, am, emb).logits
    assert torch.allclose(out, out2, atol=1e-5)


def test_trainer_mores_run_and_export(tmp_path):
    import json

    import numpy as np

    from anisogen.train import TrainConfig, load_export, train
    from anisogen.train.synthetic import make_items, write_conversations, write_npy

    items = make_items(48, d=16, seed=0)
    write_npy(tmp_path / "emb.npy", items)
    write_conversations(tmp_path / "sft.jsonl", items, ref="index")
    s = train(TrainConfig(output_dir=str(tmp_path / "run"), train_jsonl=str(tmp_path / "sft.jsonl"),
                          emb_npy=str(tmp_path / "emb.npy"), template="hf_chat", method="mores", freeze_projector=True,
                          method_options=["positions=all", "rank=2"], batch_size=8, lr=1e-2, adapter_lr=0.1,
                          max_steps=12, warmup_ratio=0.0, num_workers=0, progress=False, max_length=96,
                          projector="expand4"))
    # only the steering trains, on a random tiny LM whose predictions are near uniform: a small but real drop
    assert np.mean(s["losses"][-3:]) < np.mean(s["losses"][:3]) - 0.01
    export = tmp_path / "run" / "export"
    info = json.loads((export / "config.json").read_text())["method_info"]
    L, D = 2, 64  # the tiny LM
    assert info["parameter_counts"]["mores"] == L * 2 * (2 * D + 1)
    assert (export / "steering.safetensors").is_file()
    exp = load_export(export)
    mores = exp.model.extras["mores"]
    emb = np.stack([it["emb"] for it in items[:4]])
    caps = [it["caption"] for it in items[:4]]
    steered = exp.caption_loss(emb, caps)["loss"]
    mores.detach()
    unsteered = exp.caption_loss(emb, caps)["loss"]
    assert steered < unsteered  # the trained steering is active in the loaded export and helps
    for R in (v for k, v in mores.steering_state().items() if k.endswith(".R")):
        assert torch.allclose(R @ R.T, torch.eye(2), atol=1e-5)


def test_default_dropout_leaves_the_residual_stream_intact():
    from anisogen.train.methods.mores import MORES_OPTIONS

    assert MORES_OPTIONS["dropout_on"][0] == "delta"
    torch.manual_seed(0)
    m = MoReS(H, 1, dropout=0.5, init_identity=True).train()
    assert m.config["dropout_on"] == "delta"
    h = torch.randn(64, H)
    iv = m.interventions["0"]
    assert torch.allclose(iv(h), h, atol=1e-5)  # identity delta: dropout on it changes nothing
    # a non-zero delta: every coordinate of h survives, i.e. out - h is a dropped-out copy of the delta
    _interventions_differ_from_identity(m)
    with torch.no_grad():
        d = iv.delta(h)
        out = iv(h)
    kept = (out - h).abs() > 1e-6
    assert 0 < int((~kept).sum()) < h.numel()  # some delta entries dropped, never h itself
    assert torch.allclose((out - h)[kept], 2 * d[kept], atol=1e-4)
    assert torch.allclose((out - h)[~kept], torch.zeros(()), atol=1e-6)
    faithful = MoReS(H, 1, dropout=0.5, dropout_on="output").train()
    assert (faithful.interventions["0"](h) == 0).any()  # the authors' placement drops entries of h + delta


def test_visual_mask_hook_drives_steering_and_rebinding():
    from anisogen.train.methods.mores import bind_embedding_lm

    lm = tiny_llama()
    torch.manual_seed(1)
    elm = EmbeddingLM(lm, build_projector("expand4", 8, H), IMG, 1)
    ids = torch.tensor([[0, 0, 1, IMG, IMG, IMG, IMG, 7], [1, 5, IMG, IMG, IMG, IMG, 9, 9]])  # left padded row 0
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    emb = torch.randn(2, 1, 8)
    got = []
    handle = elm.register_visual_mask_hook(lambda vm: got.append(vm.clone()))
    with torch.no_grad():
        elm(ids, am, emb)
        elm.generate(ids, am, emb, max_new_tokens=2, pad_token_id=0)
    assert len(got) == 2 and all(torch.equal(g, ids == IMG) for g in got)
    handle.remove()
    with torch.no_grad():
        elm(ids, am, emb)
    assert len(got) == 2
    from anisogen.train.model import PlaceholderMismatch

    handle = elm.register_visual_mask_hook(lambda vm: got.append(vm))
    bad = ids.clone()
    bad[1, 2] = 5  # 3 placeholders in row 1
    with pytest.raises(PlaceholderMismatch, match="row 1"):  # rejected before any hook runs
        elm.embed(bad, emb)
    assert len(got) == 2
    handle.remove()
    assert not elm._visual_mask_hooks

    first = MoReS(H, 2, dropout=0.0, positions="f1")
    second = MoReS(H, 2, dropout=0.0, positions="l1")
    bind_embedding_lm(elm, first)
    bind_embedding_lm(elm, first)  # idempotent
    assert len(elm._visual_mask_hooks) == 1 and len(first._handles) == 2
    with torch.no_grad():
        elm(ids, am, emb)
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[0, 3] = want[1, 2] = True  # first placeholder of each row, whatever the padding side
    assert torch.equal(first._mask, want)
    bind_embedding_lm(elm, second)  # replaces the first: its hooks are gone, its mask cleared
    assert elm.extras["mores"] is second and first._mask is None and not first._handles
    assert len(elm._visual_mask_hooks) == 1 and sum(len(b._forward_hooks) for b in lm.model.layers) == 2
    with torch.no_grad():
        elm(ids, am, emb)
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[0, 6] = want[1, 5] = True
    assert torch.equal(second._mask, want)
    second.unbind()
    assert not elm._visual_mask_hooks and sum(len(b._forward_hooks) for b in lm.model.layers) == 0
