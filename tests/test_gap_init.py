"""Gap-Init: calibration hooks, PEFT LoRA overwrite, GQA handling, SPOT-Gap, trainer registration."""


import numpy as np
import pytest
import torch
from torch import nn

from anisogen.train.methods.gap_init import (
    apply_gap_init, calibration_prefix, collect_gap_stats, decoder_layers, lora_modules, make_lora_config,
    masked_layer_means, normalized_gaps, random_directions, select_layers, spot_gap_scores,
)
from anisogen.train.model import EmbeddingLM
from anisogen.train.projector import build_projector

torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention at these sizes

H = 64
IMG = 250  # placeholder id (inside the vocab of the tiny model; overwritten by the projector)


def tiny_llama(kv_heads=4, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=H, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attn_implementation="eager", tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_elm(kv_heads=4, layers=2, seed=0, d_in=16):
    lm = tiny_llama(kv_heads, layers, seed)
    torch.manual_seed(seed + 1)
    return EmbeddingLM(lm, build_projector("mlp2x_gelu", d_in, H), IMG, 1)


def calib_batches(n=6, d_in=16, seed=0, k=1, bs=3):
    """Collated-style batches: [1] <img>*k prompt... target tokens, right padded with 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, bs):
        rows, labs = [], []
        for i in range(bs):
            ln = 3 + (s + i) % 4
            prompt = [1] + [IMG] * k + [5, 6]
            tgt = torch.randint(10, 200, (ln,), generator=g).tolist()
            rows.append(prompt + tgt)
            labs.append([-100] * len(prompt) + tgt)
        T = max(map(len, rows))
        ids = torch.zeros(bs, T, dtype=torch.long)
        lab = torch.full((bs, T), -100, dtype=torch.long)
        am = torch.zeros(bs, T, dtype=torch.long)
        for i, (r, row_labels) in enumerate(zip(rows, labs)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(row_labels)] = torch.tensor(row_labels)
            am[i, : len(r)] = 1
        emb = torch.nn.functional.normalize(torch.randn(bs, 1, d_in, generator=g), dim=-1)
        out.append({"input_ids": ids, "labels": lab, "attention_mask": am, "emb": emb})
    return out


def test_decoder_layers_found_through_wrappers():
    elm = tiny_elm()
    assert decoder_layers(elm.lm) is elm.lm.model.layers
    assert decoder_layers(elm) is elm.lm.model.layers


@pytest.mark.parametrize("side", ["right", "left"])
def test_hook_means_equal_manual_computation(side):
    lm = tiny_llama()
    lm.model.norm = nn.Identity()  # so hidden_states[-1] is the raw last block output
    torch.manual_seed(1)
    lens = [5, 7, 4]
    T = max(lens)
    x = torch.randn(3, T, H)
    am = torch.zeros(3, T, dtype=torch.long)
    ma = torch.zeros(3, T, dtype=torch.bool)
    mb = torch.zeros(3, T, dtype=torch.bool)
    for i, n in enumerate(lens):
        off = 0 if side == "right" else T - n
        am[i, off:off + n] = 1
        ma[i, off + 1] = ma[i, off + 2] = True
        mb[i, off + 3:off + n] = True
    got = masked_layer_means(lm, x, am, {"a": ma, "b": mb})
    got_in = masked_layer_means(lm, x, am, {"a": ma}, layers=[1], point="input")
    for i, n in enumerate(lens):
        off = 0 if side == "right" else T - n
        xi = x[i:i + 1, off:off + n]
        hs = lm(inputs_embeds=xi, output_hidden_states=True).hidden_states  # unpadded, one sample
        for li in range(2):
            h = hs[li + 1][0].double()
            assert torch.allclose(got["a"][i, li], h[1:3].mean(0), atol=1e-5)
            assert torch.allclose(got["b"][i, li], h[3:n].mean(0), atol=1e-5)
        assert torch.allclose(got_in["a"][i, 0], hs[1][0].double()[1:3].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="row 0"):
        masked_layer_means(lm, x, am, {"a": torch.zeros_like(ma)})


def test_collect_gap_stats_separate_matches_manual():
    elm = tiny_elm()
    batches = calib_batches(n=6)
    stats = collect_gap_stats(elm.lm, elm.embed, batches, image_token_id=IMG, num_visual_tokens=1, prefix_ids=[1])
    assert stats.text.shape == (6, 2, H) and stats.visual.shape == (6, 2, H)
    # manual: each sample alone, text = [1] + targets, visual = [1] + <img>; block outputs by hooks-free
    # forward with the final norm removed
    elm.lm.model.norm = nn.Identity()
    t_means, v_means = [], []
    with torch.no_grad():
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                tgt = b["input_ids"][i][b["labels"][i] != -100]
                ids = torch.cat([torch.tensor([1]), tgt])[None]
                hs = elm.lm(input_ids=ids, output_hidden_states=True).hidden_states
                t_means.append(torch.stack([hs[li + 1][0, 1:].double().mean(0) for li in range(2)]))
                vids = torch.tensor([[1, IMG]])
                emb = elm.embed(vids, b["emb"][i:i + 1])
                hs = elm.lm(inputs_embeds=emb, output_hidden_states=True).hidden_states
                v_means.append(torch.stack([hs[li + 1][0, 1].double() for li in range(2)]))
    t_means, v_means = torch.stack(t_means), torch.stack(v_means)
    assert torch.allclose(stats.text, t_means, atol=1e-5)
    assert torch.allclose(stats.visual, v_means, atol=1e-5)
    gaps = stats.gaps()
    assert torch.allclose(gaps[1], t_means[:, 1].mean(0) - v_means[:, 1].mean(0), atol=1e-5)
    # max_samples truncates
    s4 = collect_gap_stats(elm.lm, elm.embed, batches, image_token_id=IMG, num_visual_tokens=1, max_samples=4,
                           prefix_ids=[1])
    assert s4.num_samples == 4


def test_calibration_prefix_never_position_zero():
    class Bos:
        bos_token_id = 7

    class NoBos:
        bos_token_id = None

    assert calibration_prefix((3, 4), Bos()) == [3, 4]  # the template's prefix wins over BOS
    assert calibration_prefix((), Bos()) == [7]
    with pytest.raises(ValueError, match="position 0"):
        calibration_prefix((), NoBos())
    elm = tiny_elm()
    with pytest.raises(ValueError, match="position 0"):
        collect_gap_stats(elm.lm, elm.embed, calib_batches(n=3), image_token_id=IMG, num_visual_tokens=1)
    # the prefix is used for both passes and changes the means (vs a one-token prefix)
    a = collect_gap_stats(
        elm.lm, elm.embed, calib_batches(n=3), image_token_id=IMG, num_visual_tokens=1, prefix_ids=[1]
    )
    b = collect_gap_stats(elm.lm, elm.embed, calib_batches(n=3), image_token_id=IMG, num_visual_tokens=1,
                          prefix_ids=[1, 5, 6])
    assert not torch.allclose(a.text, b.text) and not torch.allclose(a.visual, b.visual)


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_collect_gap_stats_skips_text_only_rows(mode):
    elm = tiny_elm()
    batches = calib_batches(n=6)
    flags = [torch.tensor([True, False, True]), torch.tensor([False, False, False])]
    marked = [dict(b, has_image=f) for b, f in zip(batches, flags)]
    kept = [{k: v[f] for k, v in b.items()} for b, f in zip(batches[:1], flags[:1])]
    kw = dict(image_token_id=IMG, num_visual_tokens=1, prefix_ids=[1], mode=mode)
    got = collect_gap_stats(elm.lm, elm.embed, marked, **kw)
    want = collect_gap_stats(elm.lm, elm.embed, kept, **kw)
    assert got.num_samples == 2
    assert torch.allclose(got.text, want.text) and torch.allclose(got.visual, want.visual)
    # an absent key means every row has an image; max_samples counts kept rows only
    assert collect_gap_stats(elm.lm, elm.embed, batches, **kw).num_samples == 6
    assert collect_gap_stats(elm.lm, elm.embed, marked, max_samples=1, **kw).num_samples == 1
    with pytest.raises(ValueError, match="no sample with an image"):
        collect_gap_stats(elm.lm, elm.embed, marked[1:], **kw)


def test_collect_gap_stats_joint_mode():
    elm = tiny_elm()
    batches = calib_batches(n=3, bs=3)
    stats = collect_gap_stats(elm.lm, elm.embed, batches, image_token_id=IMG, num_visual_tokens=1, mode="joint")
    b = batches[0]
    inp = elm.embed(b["input_ids"], b["emb"])
    ref = masked_layer_means(elm.lm, inp, b["attention_mask"],
                             {"t": b["labels"] != -100, "v": b["input_ids"] == IMG})
    assert torch.allclose(stats.text, ref["t"]) and torch.allclose(stats.visual, ref["v"])
    assert stats.describe()["mode"] == "joint"


def _init(elm, layers=(0, 1), r=1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), **kw):
    from peft import get_peft_model

    stats = collect_gap_stats(elm.lm, elm.embed, calib_batches(n=6), image_token_id=IMG, num_visual_tokens=1,
                              prefix_ids=[1])
    dirs = normalized_gaps({li: g for li, g in stats.gaps().items() if li in layers})
    peft_model = get_peft_model(elm.lm, make_lora_config(r=r, target_modules=targets, layers=list(layers)))
    report = apply_gap_init(peft_model, dirs, **kw)
    return peft_model, dirs, report, stats


def test_logits_unchanged_and_tensors_after_init():
    elm = tiny_elm()
    ids = torch.randint(10, 200, (2, 9))
    with torch.no_grad():
        before = elm.lm(input_ids=ids).logits.clone()
    peft_model, dirs, report, stats = _init(elm)
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert report["counts"] == {"gap_init": 10}  # 5 targets x 2 layers, MHA: every output is H
    gaps = stats.gaps()
    for name, mod in lora_modules(peft_model).items():
        li = int(name.split(".layers.")[1].split(".")[0])
        assert torch.count_nonzero(mod.lora_A["default"].weight) == 0
        want = (gaps[li] / gaps[li].norm()).float()
        assert torch.allclose(mod.lora_B["default"].weight[:, 0], want, atol=1e-7)
        assert mod.lora_B["default"].weight[:, 0].norm().item() == pytest.approx(1.0, abs=1e-6)


def test_one_backward_grad_A_nonzero_grad_B_zero():
    elm = tiny_elm()
    peft_model, _, _, _ = _init(elm)
    peft_model.train()
    ids = torch.randint(10, 200, (2, 9))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    mods = lora_modules(peft_model)
    assert mods
    for name, mod in mods.items():
        gA = mod.lora_A["default"].weight.grad
        gB = mod.lora_B["default"].weight.grad
        assert gA is not None and float(gA.abs().max()) > 0, name
        assert gB is not None and torch.count_nonzero(gB) == 0, name


def test_gqa_k_v_keep_peft_init_and_are_reported():
    elm = tiny_elm(kv_heads=2)  # k/v_proj output 2 * 16 = 32 != 64
    ids = torch.randint(10, 200, (2, 9))
    with torch.no_grad():
        before = elm.lm(input_ids=ids).logits.clone()
    peft_model, dirs, report, _ = _init(elm)
    by_name = {m["name"].split(".")[-1] + str(m["layer"]): m for m in report["modules"]}
    for li in (0, 1):
        for p in ("k_proj", "v_proj"):
            m = by_name[p + str(li)]
            assert m["action"] == "peft_init" and m["out_features"] == 32 and "32 != hidden size 64" in m["reason"]
        for p in ("q_proj", "o_proj", "down_proj"):
            assert by_name[p + str(li)]["action"] == "gap_init"
    assert report["counts"] == {"gap_init": 6, "peft_init": 4}
    for name, mod in lora_modules(peft_model).items():
        if name.endswith(("k_proj", "v_proj")):  # PEFT default: Kaiming A, zero B
            assert torch.count_nonzero(mod.lora_A["default"].weight) > 0
            assert torch.count_nonzero(mod.lora_B["default"].weight) == 0
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, before)
    # strict mode raises, exclude mode leaves k/v without adapters
    elm2 = tiny_elm(kv_heads=2)
    with pytest.raises(ValueError, match="k_proj"):
        _init(elm2, mismatch="raise")
    from peft import get_peft_model

    elm3 = tiny_elm(kv_heads=2)
    cfg = make_lora_config(target_modules=("q_proj", "k_proj", "v_proj"), layers=[0, 1],
                           exclude=[f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj")])
    pm = get_peft_model(elm3.lm, cfg)
    assert sorted(n.split(".")[-1] for n in lora_modules(pm)) == ["q_proj", "q_proj"]


def test_rank_greater_than_one_other_columns_random_unit():
    elm = tiny_elm()
    peft_model, dirs, report, _ = _init(elm, r=3, targets=("q_proj", "o_proj"))
    for name, mod in lora_modules(peft_model).items():
        B = mod.lora_B["default"].weight
        assert B.shape == (H, 3)
        li = int(name.split(".layers.")[1].split(".")[0])
        assert torch.allclose(B[:, 0], dirs[li].float(), atol=1e-7)
        assert torch.allclose(B[:, 1:].norm(dim=0), torch.ones(2), atol=1e-6)
        assert abs(float(B[:, 1].detach() @ B[:, 0].detach())) < 0.6  # random, not the gap
        assert torch.count_nonzero(mod.lora_A["default"].weight) == 0


def test_peft_round_trip(tmp_path):
    from peft import PeftModel

    elm = tiny_elm(seed=3)
    peft_model, _, _, _ = _init(elm)
    with torch.no_grad():  # make the adapter non-trivial, as after training
        for mod in lora_modules(peft_model).values():
            mod.lora_A["default"].weight.normal_(0, 0.1)
    peft_model.eval()
    ids = torch.randint(10, 200, (2, 9))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = tiny_llama(seed=3)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6)
    a = {n: m.lora_B["default"].weight for n, m in lora_modules(peft_model).items()}
    b = {n: m.lora_B["default"].weight for n, m in lora_modules(loaded).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_noise_eps_and_random_directions():
    g = {0: torch.arange(1, 65, dtype=torch.float64), 3: -torch.ones(64, dtype=torch.float64)}
    clean = normalized_gaps(g)
    assert torch.allclose(clean[0], g[0] / g[0].norm())
    noisy = normalized_gaps(g, noise_eps=0.6, seed=1)
    again = normalized_gaps(g, noise_eps=0.6, seed=1)
    for li in g:
        assert torch.equal(noisy[li], again[li])
        assert float(noisy[li].norm()) == pytest.approx(1.0)
        cos = float(noisy[li] @ clean[li])
        assert 0.6 < cos < 0.99  # ~ 1/sqrt(1 + 0.36) = 0.86
    with pytest.raises(ValueError, match="layer 0"):
        normalized_gaps({0: torch.zeros(4)})
    rd = random_directions([0, 1], 64, seed=0)
    assert all(float(v.norm()) == pytest.approx(1.0) for v in rd.values())


def _spot_gap_reference(t, v, k, a_sem, a_geom):
    """Plain-numpy SPOT-Gap (appendix C) for one layer, loops only."""
    n = t.shape[0]

    def knn(x, i):
        d = [(np.linalg.norm(x[i] - x[j]), j) for j in range(n) if j != i]
        d.sort()
        return d[:k]

    s_sem = np.array([np.linalg.norm(t[i] - v[i]) for i in range(n)])
    d_t = np.array([np.mean([d for d, _ in knn(t, i)]) for i in range(n)])
    d_v = np.array([np.mean([d for d, _ in knn(v, i)]) for i in range(n)])
    comb = a_sem * s_sem + a_geom * np.abs(d_t - d_v)
    tv = np.concatenate([t, v], axis=1)
    sm = np.array([np.mean([comb[j] for _, j in knn(tv, i)]) for i in range(n)])
    return sm.mean()


def test_spot_gap_scores_match_reference_and_ggsafe_selection():
    rng = np.random.default_rng(0)
    N, L, D = 12, 3, 5
    t = rng.standard_normal((N, L, D))
    v = rng.standard_normal((N, L, D)) * np.array([1.0, 2.0, 0.5])[None, :, None]
    v[:, 1] += 4.0  # layer 1 has the largest gap
    got = spot_gap_scores(torch.from_numpy(t), torch.from_numpy(v), k=3, alpha_sem=1.0, alpha_geom=0.5)
    want = [_spot_gap_reference(t[:, li], v[:, li], 3, 1.0, 0.5) for li in range(L)]
    assert got.tolist() == pytest.approx(want)
    assert select_layers(L, strategy="ggsafe", n=1, scores=got) == [1]
    assert select_layers(L, strategy="ggsafe", n=1, scores=got, skip_first=2) == [2]
    assert select_layers(10, strategy="last", n=6) == [4, 5, 6, 7, 8, 9]
    assert select_layers(2, strategy="last", n=6) == [0, 1]
    with pytest.raises(ValueError):
        select_layers(4, strategy="ggsafe", n=2)


def test_registered_method_prepares_gap_init_on_embedding_lm():
    from anisogen.train.methods import MethodContext, get_method, parse_options

    class Tok:
        bos_token_id = 1
        pad_token_id = 0

    class Cfg:
        freeze_projector = False

    elm = tiny_elm()
    m = get_method("gap_init")
    opts = parse_options(m, ["num_layers=1", "calib_samples=5", "targets=q_proj,o_proj"])
    logs = []
    ctx = MethodContext(model=elm, tokenizer=Tok(), config=Cfg(), options=opts, device=torch.device("cpu"),
                        calibration=lambda n: calib_batches(n=6), log=logs.append)
    setup = m.prepare(ctx)
    assert setup.info["layers"] == [1]
    assert setup.info["calibration"]["num_samples"] == 5
    assert setup.info["init_report"]["counts"] == {"gap_init": 2}
    names = [g.name for g in setup.groups]
    assert names == ["projector", "adapter"]
    adapter = setup.groups[1].params
    assert sum(p.numel() for p in adapter) == setup.info["adapter_parameters"] == 2 * (H + H)
    assert all(not p.requires_grad for n, p in elm.lm.named_parameters() if "lora_" not in n)
    assert any("gap_init: layers [1]" in s for s in logs)
    ggs = parse_options(m, ["layers=ggsafe", "num_layers=1", "calib_samples=6", "targets=q_proj"])
    elm2 = tiny_elm()
    ctx2 = MethodContext(model=elm2, tokenizer=Tok(), config=Cfg(), options=ggs, device=torch.device("cpu"),
                         calibration=lambda n: calib_batches(n=6), log=logs.append)
    info = m.prepare(ctx2).info
    scores = info["spot_gap_scores"]
    assert info["layers"] == [int(np.argmax(scores))]


def test_method_calibrates_after_the_template_prefix_and_freezes_the_projector():
    from anisogen.train.methods import MethodContext, get_method, parse_options

    class Tok:
        bos_token_id = None  # e.g. a Qwen-style tokenizer: no BOS
        pad_token_id = 0

    class Cfg:  # no freeze_projector attribute: the method default (frozen) applies
        method = "gap_init"

    m = get_method("gap_init")
    opts = parse_options(m, ["num_layers=1", "calib_samples=3", "targets=q_proj,o_proj"])
    ctx = MethodContext(model=tiny_elm(), tokenizer=Tok(), config=Cfg(), options=opts, device=torch.device("cpu"),
                        calibration=lambda n: calib_batches(n=3), log=lambda s: None)
    with pytest.raises(ValueError, match="position 0"):
        m.prepare(ctx)
    elm = tiny_elm()
    ctx = MethodContext(model=elm, tokenizer=Tok(), config=Cfg(), options=opts, device=torch.device("cpu"),
                        calibration=lambda n: calib_batches(n=3), log=lambda s: None, prefix_ids=(1, 5))
    setup = m.prepare(ctx)
    assert setup.info["calibration"]["prefix_ids"] == [1, 5]
    ref = tiny_elm()
    want = collect_gap_stats(ref.lm, ref.embed, calib_batches(n=3), image_token_id=IMG, num_visual_tokens=1,
                             prefix_ids=[1, 5], layers=[1])
    got_norm = setup.info["calibration"]["gap_norms"]["1"]
    assert got_norm == pytest.approx(float(want.gaps()[1].norm()), rel=1e-6)
    assert [g.name for g in setup.groups] == ["adapter"]
    assert not any(p.requires_grad for p in elm.projector.parameters())


def test_trainer_gap_init_run_lowers_loss_and_exports(tmp_path):
    import json

    from anisogen.train import TrainConfig, load_export, train
    from anisogen.train.synthetic import make_items, write_conversations, write_npy

    items = make_items(48, d=16, seed=0)
    write_npy(tmp_path / "emb.npy", items)
    write_conversations(tmp_path / "sft.jsonl", items, ref="index")
    s = train(TrainConfig(output_dir=str(tmp_path / "run"), train_jsonl=str(tmp_path / "sft.jsonl"),
                          emb_npy=str(tmp_path / "emb.npy"), template="hf_chat", method="gap_init", lm="tiny-gqa",
                          method_options=["calib_samples=16"], batch_size=8, lr=1e-2, adapter_lr=1e-2, max_steps=12,
                          warmup_ratio=0.0, num_workers=0, progress=False, max_length=96, projector="linear"))
    assert np.mean(s["losses"][-3:]) < np.mean(s["losses"][:3]) - 0.05
    export = tmp_path / "run" / "export"
    cfg = json.loads((export / "config.json").read_text())
    info = cfg["method_info"]
    assert info["calibration"]["num_samples"] == 16 and info["calibration"]["source"] == "train"
    # q,o,down_proj get the gap; GQA k/v_proj (32 != 64) and gate/up_proj (intermediate size) keep PEFT init
    assert info["init_report"]["counts"] == {"gap_init": 6, "peft_init": 8}
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    exp = load_export(export)
    trained = {n: m.lora_A["default"].weight for n, m in lora_modules(exp.model.lm).items()}
    assert len(trained) == 14 and all(torch.count_nonzero(w) > 0 for w in trained.values())  # A moved off 0
