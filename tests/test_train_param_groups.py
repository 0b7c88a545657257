"""Optimizer groups: per-method, per-stage learning-rate defaults with their sources, decay / no-decay
split, explicit overrides, the projector-freeze default, and the validation of a method's groups."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from anisogen.train.lm import load_lm
from anisogen.train.methods import (
    MethodContext, MethodSetup, ParamGroup, get_method, optimizer_groups, parse_options, projector_groups,
)
from anisogen.train.model import EmbeddingLM
from anisogen.train.projector import build_projector

torch.set_num_threads(1)
D_IN = 16

#: method -> {stage: {group name: lr}} with every default (no explicit flag).
EXPECTED_LR = {
    "projector": {"stage1": {"projector": 1e-3}, "stage2": {"projector": 2e-5}},
    "full": {"stage1": {"projector": 1e-3, "lm": 2e-5}, "stage2": {"projector": 2e-5, "lm": 2e-5}},
    "lora": {"stage1": {"projector": 1e-3, "adapter": 2e-4}, "stage2": {"projector": 2e-5, "adapter": 2e-4}},
    "gap_init": {"stage1": {"adapter": 2e-4}, "stage2": {"adapter": 2e-4}},
    "mores": {"stage1": {"projector": 1e-3, "steering_rotation": 2e-4, "steering_linear": 2e-4},
              "stage2": {"projector": 2e-4, "steering_rotation": 2e-4, "steering_linear": 2e-4}},
}

OPTIONS = {"lora": ["r=2"], "gap_init": ["num_layers=1", "calib_samples=4", "targets=q_proj,o_proj"],
           "mores": ["dropout=0.0"]}


def config(method, stage, **kw):
    base = dict(method=method, lr=None, adapter_lr=None, weight_decay=None, freeze_projector=None,
                train_jsonl="sft.jsonl" if stage == "stage2" else None)
    base.update(kw)
    return SimpleNamespace(**base)


def calibration(image_id, n=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, image_id, 40, 41] + torch.randint(50, 120, (3,), generator=g).tolist() for _ in range(n)])
    labels = ids.clone()
    labels[:, :4] = -100
    emb = nn.functional.normalize(torch.randn(n, 1, D_IN, generator=g), dim=-1)
    return [{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "emb": emb}]


def prepared(method_name, stage, **cfg_kw):
    lm, tok, _ = load_lm("tiny")
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    elm = EmbeddingLM(lm, build_projector("mlp2x_gelu", D_IN, lm.get_input_embeddings().weight.shape[1]), image_id, 1)
    elm.freeze_lm()
    method = get_method(method_name)
    cfg = config(method_name, stage, **cfg_kw)
    ctx = MethodContext(model=elm, tokenizer=tok, config=cfg, options=parse_options(method, OPTIONS.get(method_name)),
                        device=torch.device("cpu"), calibration=lambda n: calibration(image_id), log=lambda s: None)
    setup = method.prepare(ctx)
    return ctx.model, setup, method, cfg


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("method_name", sorted(EXPECTED_LR))
def test_default_learning_rates_per_method_and_stage(method_name, stage):
    model, setup, method, cfg = prepared(method_name, stage)
    groups, desc = optimizer_groups(model, setup, method, cfg, stage=stage)
    assert {g["name"]: g["lr"] for g in groups} == EXPECTED_LR[method_name][stage]
    assert all(g["weight_decay"] == 0.0 for g in groups)  # every default weight decay is 0
    json.dumps(desc)  # JSON-able
    assert desc["method"] == method_name and desc["stage"] == stage
    for d in desc["groups"]:
        assert d["n_params"] > 0 and d["lr_source"] and d["weight_decay_source"]
        if d["lr_source"].startswith("method"):
            assert f"method {method_name!r} default ({stage})" in d["lr_source"]
    by_name = {d["name"]: d for d in desc["groups"]}
    if method_name == "gap_init":
        assert "2602.01522" in by_name["adapter"]["lr_source"] and "Table 14" in by_name["adapter"]["lr_source"]
        assert desc["freeze_projector"]["value"] is True and "G.1" in desc["freeze_projector"]["source"]
    if method_name == "mores":
        assert "2412.12359" in by_name["steering_linear"]["lr_source"]
    if method_name in ("projector", "lora", "full"):
        assert "2310.03744" in by_name["projector"]["lr_source"]


@pytest.mark.parametrize("method_name", ["projector", "full", "lora", "mores"])
def test_biases_and_norms_get_no_weight_decay(method_name):
    model, setup, method, cfg = prepared(method_name, "stage2", weight_decay=0.1)
    groups, desc = optimizer_groups(model, setup, method, cfg, stage="stage2")
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            if g["name"].startswith("steering"):
                assert g["weight_decay"] == 0.0  # MoReS pins 0 (the Householder signs must not decay)
            elif p.ndim < 2 or "norm" in n or n.endswith("bias"):
                assert g["weight_decay"] == 0.0 and g["name"].endswith(".no_decay"), n
            else:
                assert g["weight_decay"] == 0.1 and not g["name"].endswith(".no_decay"), n
    by_name = {g["name"]: g for g in groups}
    proj = {names[id(p)] for p in by_name["projector"]["params"]}
    assert proj == {"projector.0.weight", "projector.2.weight"}
    assert {names[id(p)] for p in by_name["projector.no_decay"]["params"]} == {"projector.0.bias", "projector.2.bias"}
    assert by_name["projector.no_decay"]["lr"] == by_name["projector"]["lr"]
    if method_name == "full":
        no_decay = {names[id(p)] for p in by_name["lm.no_decay"]["params"]}
        norms = {n for n, p in model.named_parameters() if "norm" in n}
        assert norms and norms <= no_decay
        assert all(p.ndim >= 2 for p in by_name["lm"]["params"])
    src = {d["name"]: d["weight_decay_source"] for d in desc["groups"]}
    assert "explicit" in src["projector"] and "no decay" in src["projector.no_decay"]


def test_explicit_learning_rates_override_the_defaults():
    model, setup, method, cfg = prepared("lora", "stage2", lr=5e-3, adapter_lr=7e-4)
    groups, desc = optimizer_groups(model, setup, method, cfg, stage="stage2")
    assert {g["name"]: g["lr"] for g in groups} == {"projector": 5e-3, "adapter": 7e-4}
    assert all(d["lr_source"].startswith("explicit TrainConfig.") for d in desc["groups"])
    # only one of them explicit: the other keeps its default
    model, setup, method, cfg = prepared("full", "stage1", adapter_lr=1e-4)
    groups, _ = optimizer_groups(model, setup, method, cfg, stage="stage1")
    assert {g["name"]: g["lr"] for g in groups} == {"projector": 1e-3, "lm": 1e-4}


def test_gap_init_projector_frozen_by_default_and_trainable_on_request():
    model, setup, method, cfg = prepared("gap_init", "stage2")
    assert not any(p.requires_grad for p in model.projector.parameters())
    groups, _ = optimizer_groups(model, setup, method, cfg, stage="stage2")
    assert [g["name"] for g in groups] == ["adapter"]
    model, setup, method, cfg = prepared("gap_init", "stage2", freeze_projector=False)
    assert all(p.requires_grad for p in model.projector.parameters())
    groups, desc = optimizer_groups(model, setup, method, cfg, stage="stage2")
    assert {g["name"]: g["lr"] for g in groups} == {"projector": 2e-5, "adapter": 2e-4}
    assert desc["freeze_projector"] == {"value": False, "source": "explicit TrainConfig.freeze_projector "
                                                                  "(--freeze-projector)"}
    # and the built-ins freeze only on request
    model, setup, method, cfg = prepared("lora", "stage2", freeze_projector=True)
    assert [g["name"] for g in optimizer_groups(model, setup, method, cfg, stage="stage2")[0]] == ["adapter"]


def test_projector_groups_reads_the_method_default_from_the_config():
    lm, tok, _ = load_lm("tiny")
    elm = EmbeddingLM(lm, build_projector("linear", D_IN, 64), tok.convert_tokens_to_ids("<image>"), 1)
    for method, frozen in (("gap_init", True), ("lora", False)):
        ctx = MethodContext(model=elm, tokenizer=tok, config=SimpleNamespace(method=method), options={},
                            device=torch.device("cpu"))
        assert (projector_groups(ctx) == []) is frozen
        assert all(p.requires_grad is not frozen for p in elm.projector.parameters())


def test_invalid_groups_are_refused_in_one_line():
    model, setup, method, cfg = prepared("lora", "stage2")
    adapter = setup.groups[1].params
    bad = [
        (MethodSetup(groups=setup.groups + [ParamGroup("again", adapter[:1])]),
         r"method 'lora'.*in groups 'adapter' and 'again'"),
        (MethodSetup(groups=[setup.groups[0], ParamGroup("adapter", adapter + adapter[:1])]), r"method 'lora'.*twice"),
        (MethodSetup(groups=setup.groups[:1]), r"method 'lora': trainable parameters outside every group"),
        (MethodSetup(groups=[ParamGroup("x", setup.groups[0].params, role="lm")]), r"method 'lora'.*role 'lm'"),
    ]
    for s, pattern in bad:
        with pytest.raises(ValueError, match=pattern) as e:
            optimizer_groups(model, s, method, cfg, stage="stage2")
        assert "\n" not in str(e.value)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="method 'lora' left no trainable parameter"):
        optimizer_groups(model, setup, method, cfg, stage="stage2")
    with pytest.raises(ValueError, match="stage"):
        optimizer_groups(model, setup, method, cfg, stage="stage3")


def test_pinned_group_values_win():
    model, setup, method, cfg = prepared("lora", "stage2", lr=1e-2, weight_decay=0.3)
    s = MethodSetup(groups=[ParamGroup("projector", setup.groups[0].params, role="projector", lr=3e-4,
                                       weight_decay=0.0),
                            setup.groups[1]])
    groups, desc = optimizer_groups(model, s, method, cfg, stage="stage2")
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {"projector": (3e-4, 0.0),
                                                                         "adapter": (2e-4, 0.3)}
    assert desc["groups"][0]["lr_source"].startswith("pinned by method 'lora'")


def test_a_failing_method_package_does_not_break_the_others(monkeypatch):
    from anisogen.train.methods import registry

    monkeypatch.setattr(registry, "PLUGIN_MODULES", registry.PLUGIN_MODULES + ("anisogen.train.methods.no_such_pkg",))
    monkeypatch.setattr(registry, "PLUGIN_ERRORS", {})
    with pytest.warns(RuntimeWarning, match="no_such_pkg failed to import"):
        assert get_method("mores").name == "mores"
    with pytest.raises(ValueError, match="unknown method 'nope'.*no_such_pkg failed to import"):
        get_method("nope")
