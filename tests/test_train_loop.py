"""The training loop: learning, resume == uninterrupted, checkpoint contents, exports, methods, CLI."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anisogen.train import TrainConfig, load_export, train
from anisogen.train.synthetic import make_items, write_caption_shards, write_conversations, write_npy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
D = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    train_items, val_items = make_items(160, d=D, seed=0), make_items(24, d=D, seed=1)
    write_caption_shards(d / "train", train_items, samples_per_shard=20)
    write_caption_shards(d / "val", val_items, samples_per_shard=12)
    write_npy(d / "emb.npy", train_items)
    write_conversations(d / "sft.jsonl", train_items, ref="index")
    write_npy(d / "val_emb.npy", val_items)
    write_conversations(d / "val_sft.jsonl", val_items, ref="index")
    return d, train_items, val_items


def cfg(out, world, **kw):
    d = world[0]
    base = dict(output_dir=str(out), train_shards=[str(d / "train")], batch_size=8, lr=1e-2, warmup_ratio=0.0,
                num_workers=0, progress=False, log_every=1, projector="expand2", max_length=96)
    base.update(kw)
    return TrainConfig(**base)


def test_stage1_twenty_steps_lower_the_loss(tmp_path, world):
    s = train(cfg(tmp_path / "r", world, max_steps=20, val_shards=[str(world[0] / "val")], eval_every=20))
    first, last = np.mean(s["losses"][:5]), np.mean(s["losses"][-5:])
    assert last < first - 0.03, (first, last)
    assert s["batches_per_rank"] == [20] and s["final_step"] == 20
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["type"] == "train"] == list(range(1, 21))
    assert [x["type"] for x in lines].count("eval") == 1
    gens = [json.loads(x) for x in (tmp_path / "r" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and all(g["reference"].startswith("a ") for g in gens)


def test_full_and_lora_stage2_lower_instruction_loss(tmp_path, world):
    d = world[0]
    for method, margin in (("full", 0.3), ("lora", 0.1)):
        s = train(cfg(tmp_path / method, world, train_shards=[], train_jsonl=str(d / "sft.jsonl"),
                      emb_npy=str(d / "emb.npy"), template="hf_chat", method=method, max_steps=20,
                      adapter_lr=3e-3, lr=3e-3))
        first, last = np.mean(s["losses"][:5]), np.mean(s["losses"][-5:])
        assert last < first - margin, (method, first, last)


def test_resume_reproduces_uninterrupted_run(tmp_path, world):
    kw = dict(max_steps=8, method="lora", noise_std=0.05, grad_accum=2, num_workers=1, shuffle_buffer=30,
              deterministic=True, batch_size=4)
    train(cfg(tmp_path / "a", world, **kw))
    halted = train(cfg(tmp_path / "b", world, halt_at_step=3, **kw))
    assert halted["halted"] and not (tmp_path / "b" / "export").exists()
    resumed = train(cfg(tmp_path / "b", world, **kw))
    assert resumed["start_step"] == 3 and resumed["batches_per_rank"] == [10]
    for f in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000008" / f))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000008" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    la = json.loads((tmp_path / "a" / "run_summary.json").read_text())["losses"]
    assert la[3:] == resumed["losses"]
    # a completed run re-invoked trains nothing and re-exports the same weights
    again = train(cfg(tmp_path / "b", world, **kw))
    assert again["losses"] == [] and again["start_step"] == 8
    # changing a trajectory setting is refused
    with pytest.raises(ValueError, match="different config.*lr"):
        train(cfg(tmp_path / "b", world, **dict(kw, max_steps=8), lr=5e-3))


def test_checkpoints_hold_only_trainable_tensors(tmp_path, world):
    s = train(cfg(tmp_path / "p", world, max_steps=2, save_every=1, keep_checkpoints=1))
    ckpts = sorted((tmp_path / "p" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000002"]  # pruned to one, no temp dirs left
    t = load_file(str(ckpts[0] / "trainable.safetensors"))
    assert sorted(t) == ["projector.0.bias", "projector.0.weight"]
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert sorted(state["trainable_names"]) == sorted(t) and state["step"] == 2
    assert state["data"]["consumed_batches_per_rank"] == 2
    opt = load_file(str(ckpts[0] / "optimizer.safetensors"))
    assert {k.rsplit("::", 1)[1] for k in opt} == {"step", "exp_avg", "exp_avg_sq"}
    assert {k.rsplit("::", 1)[0] for k in opt} == set(t)  # optimizer state keyed by parameter name
    assert state["format_version"] == 2 and state["max_steps"] == 2
    train(cfg(tmp_path / "l", world, max_steps=1, method="lora", template="plain"))
    t = load_file(str(tmp_path / "l" / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    assert all(k.startswith("projector.") or "lora_" in k for k in t)
    assert any("lora_A" in k for k in t) and any("lora_B" in k for k in t)
    assert s["final_step"] == 2


def test_grad_accumulation_normalises_by_tokens_in_window(tmp_path, world):
    one = train(cfg(tmp_path / "one", world, max_steps=1, batch_size=4, grad_accum=1, shuffle_buffer=1))
    acc = train(cfg(tmp_path / "acc", world, max_steps=1, batch_size=2, grad_accum=2, shuffle_buffer=1))
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()[0])
    assert m1["tokens"] == m2["tokens"]
    assert one["losses"][0] == pytest.approx(acc["losses"][0], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


def test_export_loads_and_generates(tmp_path, world):
    d, _, val = world
    train(cfg(tmp_path / "e", world, max_steps=4, method="lora", template="hf_chat", prompt="Describe."))
    exp = tmp_path / "e" / "export"
    names = {p.name for p in exp.iterdir()}
    assert {"config.json", "projector.safetensors", "adapter", "tokenizer", "lm"} <= names
    assert (exp / "adapter" / "adapter_model.safetensors").is_file()
    conf = json.loads((exp / "config.json").read_text())
    assert conf["clip_fingerprint"] == "synthetic" and conf["normalization"] == {"l2_normalize": True, "noise_std": 0.0}
    assert conf["projector"] == {"kind": "expand2", "d_in": D, "d_out": 64, "tokens_per_vector": 2}
    m = load_export(exp)
    emb = np.stack([v["emb"] for v in val[:3]])
    texts = m.generate(emb, max_new_tokens=8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert [m.generate(e[None], max_new_tokens=8)[0] for e in emb] == texts  # batching does not change results
    # the exported projector equals the last checkpoint's
    ck = load_file(str(tmp_path / "e" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert torch.equal(m.model.projector[0].weight, ck["projector.0.weight"])
    lora = {k: v for k, v in ck.items() if "lora_A" in k}
    live = dict(m.model.named_parameters())
    assert all(torch.equal(live[k], v) for k, v in lora.items())
    loss = m.caption_loss(emb, [v["caption"] for v in val[:3]])
    assert loss["tokens"] > 0 and np.isfinite(loss["loss"])
    with pytest.raises(ValueError, match="expects"):
        m.generate(np.ones((2, D + 1), np.float32))


def test_wrong_embedding_dim_for_projector(tmp_path, world):
    train(cfg(tmp_path / "s1", world, max_steps=1))
    other = tmp_path / "d24"
    write_caption_shards(other, make_items(16, d=24, seed=3), samples_per_shard=8)
    with pytest.raises(ValueError, match="does not match this run's projector"):
        train(cfg(tmp_path / "s2", world, train_shards=[str(other)], init_from=str(tmp_path / "s1" / "export"),
                  max_steps=1))


def _load_pipeline(name):
    """The command behind pipelines/<name>.py (anisogen.commands.<name>)."""
    return importlib.import_module(f"anisogen.commands.{name}")


def test_cli_stage2_then_evaluate(tmp_path, world):
    d, _, val = world
    train_cli = _load_pipeline("train")
    ev_cli = _load_pipeline("evaluate")

    stage1 = tmp_path / "s1"
    assert train_cli.main(["--train-shards", str(d / "train"), "--output-dir", str(stage1), "--lm", "tiny",
                           "--max-steps", "3", "--batch-size", "8", "--num-workers", "0", "--no-progress",
                           "--projector", "mlp2x_gelu"]) == 0
    stage2 = tmp_path / "s2"
    assert train_cli.main(["--train-jsonl", str(d / "sft.jsonl"), "--emb-npy", str(d / "emb.npy"),
                           "--val-jsonl", str(d / "val_sft.jsonl"), "--template", "vicuna_v1", "--max-length", "512",
                           "--init-from", str(stage1 / "export"), "--method", "lora", "--opt", "r=4",
                           "--opt", "targets=q_proj,v_proj", "--output-dir", str(stage2), "--max-steps", "3",
                           "--batch-size", "4", "--num-workers", "0", "--eval-every", "3", "--no-progress"]) == 0
    conf = json.loads((stage2 / "export" / "config.json").read_text())
    assert conf["method"] == "lora" and conf["method_info"]["options"]["r"] == 4
    assert conf["method_info"]["options"]["targets"] == ["q_proj", "v_proj"]
    assert conf["clip_fingerprint"] == "synthetic"
    out = tmp_path / "eval"
    assert ev_cli.main(["--export", str(stage1 / "export"), "--shards", str(d / "val"), "--attributes", "synthetic",
                        "--max-new-tokens", "6", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n"] == len(val) and set(rep["attributes"]) == {"color", "shape", "position", "all_exact"}
    assert len((out / "captions.jsonl").read_text().splitlines()) == len(val)


def test_sigint_saves_a_checkpoint_and_metrics_are_not_repeated_after_resume(tmp_path, world):
    import signal

    kw = dict(max_steps=8, save_every=2, batch_size=4)
    ref = train(cfg(tmp_path / "ref", world, **kw))

    def crash_at_3(step):  # a crash after step 3: steps 1-3 logged, last checkpoint at step 2
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "b", world, **kw), on_step=crash_at_3)

    def ctrl_c_at_5(step):
        if step == 5:
            signal.raise_signal(signal.SIGINT)  # the handler only sets a flag: the step finishes, then saves

    s = train(cfg(tmp_path / "b", world, **kw), on_step=ctrl_c_at_5)
    assert s["start_step"] == 2 and s["halted"] and s["interrupted"] == "SIGINT" and s["final_step"] == 5
    assert (tmp_path / "b" / "checkpoints" / "step-00000005" / "state.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    done = train(cfg(tmp_path / "b", world, **kw))
    assert done["start_step"] == 5 and done["final_step"] == 8
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == list(range(1, 9))  # step 3 (redone after the crash) appears once
    assert done["losses"] == ref["losses"][5:]


def test_evaluate_export_in_chunks_equals_one_pass(tmp_path, world):
    from anisogen.train.evaluation import evaluate_export

    train(cfg(tmp_path / "e", world, max_steps=1))
    exp = load_export(tmp_path / "e" / "export")
    items = world[2]
    emb = np.stack([it["emb"] for it in items])[:20]
    caps = [it["caption"] for it in items][:20]
    rep = evaluate_export(exp, emb, caps, batch_size=1, max_new_tokens=4)  # 16-pair chunks: 2 chunks
    loss = exp.caption_loss(emb, caps, batch_size=1)
    gens = exp.generate(emb, max_new_tokens=4, batch_size=1)
    assert [s["generated"] for s in rep["samples"]] == gens
    assert [s["loss"] for s in rep["samples"]] == loss["per_sample"]
    assert rep["caption_tokens"] == loss["tokens"] and rep["caption_loss"] == pytest.approx(loss["loss"], rel=1e-12)
