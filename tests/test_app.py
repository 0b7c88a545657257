"""APP (Anchor-Preserving Projection): spectral filtering of the projector task vector."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from anisogen.train.methods.app import (
    AppConfig, app_merge, check_app_run, choose_k, coadapted_parts, export_slug, merge_files, parse_app_spec,
    split_post_spec, svd_truncate, ties_trim,
)
from anisogen.train.projector import build_projector

torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention at these sizes


def _projector_pair(seed=0, d_in=24, d_out=20, kind="mlp2x_gelu", scale=0.1):
    torch.manual_seed(seed)
    pre = build_projector(kind, d_in, d_out).state_dict()
    ft = {k: v + scale * torch.randn_like(v) for k, v in pre.items()}
    return pre, ft


def _planted(m=40, n=30, k=5, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0][:k], dtype=torch.float64)
    low = (u * s) @ v.T
    return low, low + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def test_planted_low_rank_plus_noise_recovers_rank_k():
    low, tau = _planted()
    tau_k, info = svd_truncate(tau, mode="energy", energy=0.999)
    assert info["k"] == 5
    assert info["rank"] == 30  # the noise makes tau full rank
    assert torch.linalg.matrix_rank(tau_k).item() == 5
    # truncation denoises: closer to the planted matrix than the raw task vector
    err_k = float((tau_k - low).norm())
    err_raw = float((tau - low).norm())
    assert err_k < 0.7 * err_raw  # expected ratio ~ sqrt(k(m+n)/(mn)) = 0.54
    assert err_k / float(low.norm()) < 5e-3
    # ratio rule on the same matrix: floor(30 * 0.25) = 7 components
    _, info_r = svd_truncate(tau, mode="ratio", k_ratio=0.25)
    assert info_r["k"] == 7


def test_energy_rule_picks_smallest_k():
    # singular values 4, 3, 2, 1: energies 16, 9, 4, 1 out of 30
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert choose_k(s, 4, mode="energy", energy=0.5) == 1  # 16/30 = 0.533
    assert choose_k(s, 4, mode="energy", energy=0.8) == 2  # 25/30 = 0.833
    assert choose_k(s, 4, mode="energy", energy=25 / 30) == 2  # exactly on the boundary
    assert choose_k(s, 4, mode="energy", energy=0.84) == 3
    assert choose_k(s, 4, mode="energy", energy=1.0) == 4
    # brute force on a random matrix: smallest k whose cumulative energy reaches the threshold
    torch.manual_seed(3)
    tau = torch.randn(17, 11, dtype=torch.float64)
    sv = np.linalg.svd(tau.numpy(), compute_uv=False)
    cum = np.cumsum(sv**2) / np.sum(sv**2)
    for e in (0.1, 0.5, 0.8, 0.95, 0.999):
        want = min(k for k in range(1, 12) if cum[k - 1] >= e)
        _, info = svd_truncate(tau, mode="energy", energy=e)
        assert info["k"] == want
        assert info["retained_energy"] == pytest.approx(cum[want - 1])
        assert info["retained_energy"] >= e and (want == 1 or cum[want - 2] < e)


def test_ratio_rule_and_clamps():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert choose_k(s, 4, mode="ratio", k_ratio=0.25) == 1
    assert choose_k(s, 4, mode="ratio", k_ratio=0.6) == 2  # floor(2.4)
    assert choose_k(s, 4, mode="ratio", k_ratio=0.1) == 1  # min_k
    assert choose_k(s, 3, mode="ratio", k_ratio=1.0) == 3  # never above the rank
    zero, info = svd_truncate(torch.zeros(5, 4), mode="energy")
    assert info["k"] == 0 and info["rank"] == 0 and float(zero.abs().sum()) == 0.0


def test_alpha_zero_gives_pre_for_every_policy():
    pre, ft = _projector_pair()
    for policy in ("full", "drop", "scale"):
        for mode in ("energy", "ratio", "naive", "ties"):
            merged, _ = app_merge(pre, ft, AppConfig(mode=mode, alpha=0.0, bias_policy=policy))
            for k in pre:
                assert torch.equal(merged[k], pre[k]), (policy, mode, k)


def test_full_rank_alpha_one_gives_ft():
    pre, ft = _projector_pair()
    merged, report = app_merge(pre, ft, AppConfig(mode="ratio", k_ratio=1.0, alpha=1.0))
    for k in pre:
        assert torch.allclose(merged[k], ft[k], atol=1e-6, rtol=0), k
    for name in ("0.weight", "2.weight"):
        t = report["tensors"][name]
        assert t["k"] == t["rank"] == min(pre[name].shape)
        assert t["retained_energy"] == pytest.approx(1.0)
    naive, rep = app_merge(pre, ft, mode="naive")
    assert rep["method"] == "naive"
    for k in pre:
        assert torch.allclose(naive[k], ft[k], atol=1e-6, rtol=0)


def test_merge_equals_independent_numpy_truncation():
    pre, ft = _projector_pair(seed=4)
    merged, report = app_merge(pre, ft, AppConfig(mode="ratio", k_ratio=0.25, alpha=0.7))
    for name in ("0.weight", "2.weight"):
        tau = (ft[name].double() - pre[name].double()).numpy()
        u, s, vt = np.linalg.svd(tau, full_matrices=False)
        k = math.floor(min(tau.shape) * 0.25)
        want = pre[name].double().numpy() + 0.7 * (u[:, :k] * s[:k]) @ vt[:k]
        assert report["tensors"][name]["k"] == k
        np.testing.assert_allclose(merged[name].double().numpy(), want, atol=1e-6)
        assert report["tensors"][name]["spectrum"] == pytest.approx(s.tolist())
    assert merged["0.weight"].dtype == ft["0.weight"].dtype


def test_bias_policies():
    pre, ft = _projector_pair(seed=1)
    db = {k: ft[k] - pre[k] for k in ("0.bias", "2.bias")}
    full, _ = app_merge(pre, ft, AppConfig(mode="energy", bias_policy="full", alpha=0.5))
    drop, _ = app_merge(pre, ft, AppConfig(mode="energy", bias_policy="drop", alpha=0.5))
    scale, rep = app_merge(pre, ft, AppConfig(mode="energy", bias_policy="scale", alpha=0.5))
    const, _ = app_merge(pre, ft, AppConfig(mode="energy", bias_policy="scale", bias_scale=0.3, alpha=0.5))
    for b in ("0.bias", "2.bias"):
        w = b.replace("bias", "weight")
        assert torch.allclose(full[b], pre[b] + 0.5 * db[b], atol=1e-7)
        assert torch.equal(drop[b], pre[b])
        # scale: rho = ||tau_k||_F / ||tau||_F of the sibling weight, computed independently
        tau = (ft[w].double() - pre[w].double()).numpy()
        sv = np.linalg.svd(tau, compute_uv=False)
        k = rep["tensors"][w]["k"]
        rho = math.sqrt(np.sum(sv[:k] ** 2) / np.sum(sv**2))
        assert rep["tensors"][b]["scale"] == pytest.approx(rho)
        assert 0 < rho < 1
        assert torch.allclose(scale[b], pre[b] + 0.5 * rho * db[b], atol=1e-6)
        assert torch.allclose(const[b], pre[b] + 0.5 * 0.3 * db[b], atol=1e-6)
        # weights do not depend on the bias policy
        assert torch.equal(full[w], drop[w]) and torch.equal(full[w], scale[w])


def test_per_layer_selection_filters_only_selected_matrices():
    pre, ft = _projector_pair(seed=2)
    merged, rep = app_merge(pre, ft, AppConfig(mode="ratio", k_ratio=0.25, include=r"^2\."))
    assert torch.allclose(merged["0.weight"], ft["0.weight"], atol=1e-6)  # layer 1: full delta
    assert not torch.allclose(merged["2.weight"], ft["2.weight"], atol=1e-3)  # layer 2: filtered
    assert rep["tensors"]["0.weight"]["filtered"] is False
    assert rep["tensors"]["2.weight"]["filtered"] is True
    assert rep["totals"] == {
        "matrices": 2,
        "filtered": 1,
        "retained_energy": pytest.approx(rep["totals"]["retained_energy"]),
    }
    merged_list, _ = app_merge(pre, ft, AppConfig(mode="ratio", k_ratio=0.25, include=["2.weight"]))
    assert torch.equal(merged_list["2.weight"], merged["2.weight"])


def test_ties_trim_keeps_largest_entries():
    t = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    out, info = ties_trim(t, 0.34)  # ceil(0.34 * 6) = 3 entries
    assert info["kept"] == 3
    assert torch.equal(out.float(), torch.tensor([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    pre, ft = _projector_pair(seed=5)
    merged, rep = app_merge(pre, ft, parse_app_spec("ties:0.5"))
    tau = ft["2.weight"] - pre["2.weight"]
    kept = (merged["2.weight"] - pre["2.weight"]).abs() > 1e-7
    assert int(kept.sum()) == math.ceil(0.5 * tau.numel())
    assert rep["method"] == "ties"


def test_parse_app_spec():
    assert parse_app_spec("energy:0.8").mode == "energy"
    assert parse_app_spec("energy:0.9").energy == 0.9
    c = parse_app_spec("ratio:0.3", alpha=0.5, bias_policy="drop")
    assert (c.mode, c.k_ratio, c.alpha, c.bias_policy) == ("ratio", 0.3, 0.5, "drop")
    assert parse_app_spec("naive").mode == "naive"
    assert parse_app_spec("ratio").k_ratio == 0.25
    for bad in ("svd:0.3", "energy:abc", "energy:1.5", "naive:0.2", "ratio:0"):
        with pytest.raises(ValueError):
            parse_app_spec(bad)
    with pytest.raises(ValueError, match="bias policy"):
        AppConfig(bias_policy="half")


def test_mismatched_state_dicts_name_the_tensor():
    pre, ft = _projector_pair()
    ft2 = dict(ft)
    del ft2["2.bias"]
    with pytest.raises(KeyError, match="2.bias"):
        app_merge(pre, ft2)
    ft3 = dict(ft)
    ft3["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="0.weight"):
        app_merge(pre, ft3)
    ft4 = dict(ft)
    ft4["0.weight"] = ft["0.weight"].clone()
    ft4["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        app_merge(pre, ft4)


def test_merge_files_round_trip(tmp_path):
    pre, ft = _projector_pair(seed=7)
    save_file(pre, str(tmp_path / "pre.safetensors"))
    (tmp_path / "ft").mkdir()
    save_file(ft, str(tmp_path / "ft" / "projector.safetensors"), metadata={"kind": "mlp2x_gelu"})
    cfg = parse_app_spec("energy:0.8")
    report = merge_files(tmp_path / "pre.safetensors", tmp_path / "ft", tmp_path / "out", cfg)
    merged = load_file(str(tmp_path / "out" / "projector.safetensors"))
    want, _ = app_merge(pre, ft, cfg)
    for k in want:
        assert torch.equal(merged[k], want[k])
    on_disk = json.loads((tmp_path / "out" / "app_report.json").read_text())
    assert on_disk["tensors"]["2.weight"]["k"] == report["tensors"]["2.weight"]["k"]
    assert on_disk["tensors"]["2.weight"]["retained_energy"] >= 0.8
    assert not list((tmp_path / "out").glob("*.partial"))
    with pytest.raises(FileNotFoundError):
        merge_files(tmp_path / "missing.safetensors", tmp_path / "ft", tmp_path / "o2", cfg)


# ----------------------------------------------------------------------------------------- trainer integration


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    from anisogen.train import TrainConfig, train
    from anisogen.train.synthetic import make_items, write_caption_shards, write_conversations, write_npy

    d = tmp_path_factory.mktemp("app_world")
    items = make_items(64, d=16, seed=0)
    write_caption_shards(d / "train", items, samples_per_shard=32)
    write_npy(d / "emb.npy", items)
    write_conversations(d / "sft.jsonl", items, ref="index")
    train(TrainConfig(output_dir=str(d / "s1"), train_shards=[str(d / "train")], batch_size=8, lr=1e-2, max_steps=4,
                      warmup_ratio=0.0, num_workers=0, progress=False, projector="mlp2x_gelu", max_length=96))
    return d


def test_trainer_post_app_writes_raw_and_merged_exports(stage1, tmp_path):
    from anisogen.train import TrainConfig, load_export, train

    d = stage1
    s = train(TrainConfig(output_dir=str(tmp_path / "s2"), train_jsonl=str(d / "sft.jsonl"), emb_npy=str(d / "emb.npy"),
                          template="hf_chat", method="projector", init_from=str(d / "s1" / "export"), batch_size=8,
                          lr=3e-3, max_steps=6, warmup_ratio=0.0, num_workers=0, progress=False, max_length=96,
                          projector="mlp2x_gelu", post=["app:ratio:0.25"]))
    raw = tmp_path / "s2" / "export"
    merged_dir = tmp_path / "s2" / "export_app-ratio-0.25"
    assert s["post"]["app:ratio:0.25"]["export"] == str(merged_dir)
    pre = load_file(str(d / "s1" / "export" / "projector.safetensors"))
    ft = load_file(str(raw / "projector.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "s2" / "projector_pre.safetensors"))["2.weight"], pre["2.weight"])
    want, _ = app_merge(pre, ft, parse_app_spec("ratio:0.25"))
    got = load_file(str(merged_dir / "projector.safetensors"))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-7), k
    assert not torch.allclose(got["2.weight"], ft["2.weight"], atol=1e-6)
    report = json.loads((merged_dir / "app_report.json").read_text())
    assert report["tensors"]["2.weight"]["k"] == math.floor(report["tensors"]["2.weight"]["rank"] * 0.25)
    exp = load_export(merged_dir)
    assert torch.equal(exp.model.projector.state_dict()["2.weight"], got["2.weight"])
    assert exp.caption_loss(np.ones((2, 16), np.float32), ["a red circle", "a blue star"])["tokens"] > 0
    # the CLI reproduces the in-trainer merge from the two files
    from anisogen.commands import merge as cli

    assert cli.main(["--pre", str(tmp_path / "s2" / "projector_pre.safetensors"), "--ft", str(raw), "--app",
                     "ratio:0.25",
                     "--out", str(tmp_path / "cli"), "--export-from", str(raw), "--spectrum",
                     str(tmp_path / "spec")]) == 0
    cli_out = load_file(str(tmp_path / "cli" / "projector.safetensors"))
    assert all(torch.equal(cli_out[k], got[k]) for k in got)
    assert (tmp_path / "cli" / "config.json").is_file() and (tmp_path / "spec" / "spectrum.png").is_file()
    assert torch.equal(load_export(tmp_path / "cli").model.projector.state_dict()["0.weight"], got["0.weight"])


# ----------------------------------------------------------------------------------------- refusals


class _Cfg:
    def __init__(self, method="projector", init_from="runs/s1/export"):
        self.method, self.init_from = method, init_from


def test_post_spec_flags_and_slug():
    assert split_post_spec("ratio:0.3,allow_random_anchor") == ("ratio:0.3", {"allow_random_anchor"})
    assert split_post_spec("force") == ("energy:0.8", {"allow_random_anchor", "allow_coadapted"})
    assert split_post_spec("") == ("energy:0.8", set())
    assert export_slug("energy:0.8,force") == export_slug("energy:0.8") == "energy-0.8"
    with pytest.raises(ValueError, match="neither a flag"):
        split_post_spec("ratio:0.3,ratio:0.2")


def test_app_refuses_a_random_anchor_unless_allowed():
    proj = ["projector.0.weight", "projector.0.bias"]
    with pytest.raises(ValueError, match="no --init-from.*allow_random_anchor") as e:
        check_app_run(_Cfg(init_from=None), "ratio:0.25", proj)
    assert "\n" not in str(e.value)
    for spec in ("ratio:0.25,allow_random_anchor", "ratio:0.25,force"):
        ok = check_app_run(_Cfg(init_from=None), spec, proj)
        assert ok["rule"] == "ratio:0.25" and "allow_random_anchor" in ok["flags"]
        assert len(ok["warnings"]) == 1 and "random initialisation" in ok["warnings"][0]
    assert check_app_run(_Cfg(), "ratio:0.25", proj)["warnings"] == []
    with pytest.raises(ValueError, match="projector was not trainable"):
        check_app_run(_Cfg(), "energy:0.8", ["lm.layers.0.lora_A.weight"])


def test_app_refuses_coadapted_adapters_unless_allowed():
    names = ["projector.0.weight", "lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    with pytest.raises(ValueError, match="method 'lora'.*co-adapt.*--method projector.*allow_coadapted") as e:
        check_app_run(_Cfg("lora"), "energy:0.8", names)
    assert "\n" not in str(e.value)
    ok = check_app_run(_Cfg("lora"), "energy:0.8,allow_coadapted", names)
    assert ok["flags"] == ["allow_coadapted"] and "co-adapt" in ok["warnings"][0]
    # force lifts both refusals at once
    assert len(check_app_run(_Cfg("mores", init_from=None), "force", names + ["extras.mores.x"])["warnings"]) == 2


def test_check_postprocessors_refuses_before_training():
    from types import SimpleNamespace

    from anisogen.train.methods import check_postprocessors

    proj = ["projector.0.weight"]
    cfg = SimpleNamespace(method="projector", init_from=None, post=["app:ratio:0.25"])
    with pytest.raises(ValueError, match="no --init-from"):
        check_postprocessors(cfg, proj)
    check_postprocessors(SimpleNamespace(method="projector", init_from=None, post=["app:ratio:0.25,force"]), proj)
    check_postprocessors(SimpleNamespace(method="projector", init_from=None, post=[]), proj)


def test_trainer_post_app_refusals_and_overrides(stage1, tmp_path):
    from anisogen.train import TrainConfig, train

    d = stage1
    base = dict(train_jsonl=str(d / "sft.jsonl"), emb_npy=str(d / "emb.npy"), template="hf_chat", batch_size=8,
                lr=3e-3, adapter_lr=3e-3, max_steps=2, warmup_ratio=0.0, num_workers=0, progress=False,
                max_length=96, projector="mlp2x_gelu")
    init = str(d / "s1" / "export")
    with pytest.raises(ValueError, match="no --init-from"):
        train(TrainConfig(output_dir=str(tmp_path / "a"), method="projector", post=["app:ratio:0.25"], **base))
    s = train(TrainConfig(output_dir=str(tmp_path / "b"), method="projector",
                          post=["app:ratio:0.25,allow_random_anchor"],
                          **base))
    rep = json.loads((tmp_path / "b" / "export_app-ratio-0.25" / "app_report.json").read_text())
    assert rep["overrides"]["flags"] == ["allow_random_anchor"]
    assert s["post"]["app:ratio:0.25,allow_random_anchor"]["overrides"]["flags"] == ["allow_random_anchor"]
    lora = dict(method="lora", init_from=init, method_options=["r=2"], freeze_projector=False, **base)
    with pytest.raises(ValueError, match="co-adapt"):
        train(TrainConfig(output_dir=str(tmp_path / "c"), post=["app:ratio:0.25"], **lora))
    train(TrainConfig(output_dir=str(tmp_path / "d"), post=["app:ratio:0.25,allow_coadapted"], **lora))
    assert (tmp_path / "d" / "export_app-ratio-0.25" / "adapter").is_dir()
    # the offline merge refuses to put a merged projector next to that run's adapter, unless allowed
    from anisogen.commands import merge as cli

    raw = tmp_path / "d" / "export"
    assert coadapted_parts(raw) == ["adapter/ (PEFT adapter)"]
    argv = ["--pre", str(tmp_path / "d" / "projector_pre.safetensors"), "--ft", str(raw), "--app", "ratio:0.25",
            "--out", str(tmp_path / "m"), "--export-from", str(raw)]
    assert cli.main(argv) == 2 and not (tmp_path / "m").exists()
    assert cli.main(argv + ["--allow-coadapted"]) == 0
    rep = json.loads((tmp_path / "m" / "app_report.json").read_text())
    assert rep["overrides"]["coadapted_parts"] == ["adapter/ (PEFT adapter)"]
    assert coadapted_parts(d / "s1" / "export") == []
