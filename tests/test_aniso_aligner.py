"""The registered AnisoAlign aligners: sanity reduction, bounds, determinism, artifacts, ablations."""

import json

import numpy as np
import pytest
import torch

from anisogen.align import ALIGNERS, fit_aligner, load_aligner
from anisogen.align.aniso import ANISO_VARIANTS
from anisogen.align.aniso.frame import choose_rank
from anisogen.align.aniso.polar import wrap
from anisogen.synthetic import make_paired_embeddings

TINY = dict(rank=4, score_hidden=16, score_layers=1, refiner_hidden=16, refiner_layers=1, stage1_steps=30,
            stage2_steps=30, batch_size=128, stage1_batch_size=128, eval_every=10, stage1_eval_every=10,
            stage1_patience=None, log_every=10, radial_knots=256, transform_block=64, val_size=256)
#: the full method with fixed settings (no selection), every knob of eq. 7 active
FIXED = dict(select="none", bounds="fixed", refine_v=True, shrinkage=1.0)


def _l2(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    pairs = make_paired_embeddings(4000, 16, gap=0.5, residual_rank=2, seed=3)
    fit_text, fit_image, held = pairs.split(2000, seed=0, keep_antithetic=True)
    return fit_text, fit_image, held


@pytest.fixture(scope="module")
def full(data):
    fit_text, fit_image, _ = data
    return fit_aligner("anisoalign", text=fit_text, image=fit_image, seed=1, model_fingerprint="toy:abc",
                       **{**TINY, **FIXED, "stage2_lr": 0.02, "stage2_steps": 60})


def test_all_variants_are_registered():
    assert set(ANISO_VARIANTS) <= set(ALIGNERS)
    assert len(ANISO_VARIANTS) == 6


@pytest.mark.parametrize("name", ["anisoalign-init", "anisoalign-refine"])
def test_identity_maps_and_zero_refinement_reduce_to_anchor_renormalise_calibrate(name, data):
    fit_text, fit_image, held = data
    aligner = fit_aligner(name, text=fit_text, image=fit_image, radial_map="identity", v_scaling="identity",
                          ablation_reading="objectives", **TINY)
    mu_t, mu_i = fit_text.mean(0), fit_image.mean(0)
    # independent computation: anchor shift, renormalise, centroid calibration with mu_hat from the fit texts
    mu_hat = _l2(fit_text - mu_t + mu_i).mean(0)
    expected = _l2(_l2(held.text - mu_t + mu_i) - mu_hat + mu_i)
    np.testing.assert_allclose(aligner.transform(held.text), expected, atol=2e-7)
    np.testing.assert_allclose(aligner.tensors["mu_hat"], mu_hat, atol=1e-13)
    state = aligner.refined_state(held.text[:100])
    np.testing.assert_allclose(state["mapped"], held.text[:100] - mu_t + mu_i, atol=1e-13)  # B c + v0 = y_bar
    # and the same as the registered centroid aligner followed by the calibration
    centroid = fit_aligner("centroid", text=fit_text, image=fit_image)
    mu_hat_c = centroid.transform(fit_text).astype(np.float64).mean(0)
    np.testing.assert_allclose(aligner.transform(held.text), _l2(centroid.transform(held.text) - mu_hat_c + mu_i),
                               atol=1e-6)


@pytest.mark.parametrize("name", ["anisoalign-init", "anisoalign"])
def test_outputs_are_unit_float32_and_batch_independent(name, data, full):
    fit_text, fit_image, held = data
    aligner = full if name == "anisoalign" else fit_aligner(name, text=fit_text, image=fit_image, **TINY)
    z = aligner.transform(held.text)
    assert z.dtype == np.float32 and z.shape == held.text.shape
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(aligner.transform(held.text[5:9]), z[5:9])
    np.testing.assert_array_equal(aligner.transform(held.text[77:78]), z[77:78])
    np.testing.assert_array_equal(aligner.transform(held.text, batch_size=333), z)
    np.testing.assert_array_equal(aligner.transform(held.text[::-1])[::-1], z)  # order-independent too


def test_bounds_hold_on_every_output(data, full):
    _, _, held = data
    state = full.refined_state(held.text)
    step = wrap(state["theta_hat"] - state["theta0"])
    assert np.abs(step).max() <= 0.2 + 1e-12
    assert np.abs(step).max() > 1e-3  # the refinement is active, not trivially within bounds
    ratio = state["rho_hat"] / state["rho0"]
    assert ratio.min() >= np.exp(-0.1) - 1e-12 and ratio.max() <= np.exp(0.1) + 1e-12
    dv = state["v_hat"] - state["v0"]
    assert np.abs(dv @ full.frame.basis).max() < 1e-15  # v_hat stays in V
    assert np.linalg.norm(dv, axis=1).max() <= 0.002 * np.sqrt(16) + 1e-12
    assert np.abs(state["v0"] @ full.frame.basis).max() < 1e-14  # v^(0) in V too


def test_artifact_round_trip_is_bit_identical_and_checks_the_fingerprint(data, full, tmp_path):
    _, _, held = data
    full.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["name"] == "anisoalign" and config["params"]["rank"] == 4 and config["model_fingerprint"] == "toy:abc"
    # a quarter of each side (at most select_size rows) is held out: Stage-I validation and bound scaling
    assert config["fit_counts"]["text_sample"] == 750 and config["fit_counts"]["image_sample"] == 750
    assert config["fit_counts"]["select_sample"] == 250
    keys = set(config["tensors"])
    assert {"mu_hat", "mu_image", "frame.basis", "frame.mixing", "prior.edges", "init.d_v", "init.image_knots"} <= keys
    assert any(k.startswith("score_net.") for k in keys) and any(k.startswith("refiner.") for k in keys)
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert len(history["stage1_L_I_val"]) == 4 and len(history["stage2_objective_val"]) == 7
    assert history["stage1_steps_run"] == [30.0] and history["stage2_steps_run"] == [60.0]
    assert not list((tmp_path / "a").glob("*.pkl")) and not list((tmp_path / "a").glob("*.pt"))
    loaded = load_aligner(tmp_path / "a", model_fingerprint="toy:abc", dim=16)
    np.testing.assert_array_equal(loaded.transform(held.text), full.transform(held.text))
    for key, value in full.refined_state(held.text[:50]).items():
        np.testing.assert_array_equal(loaded.refined_state(held.text[:50])[key], value)
    with pytest.raises(ValueError, match="fitted for CLIP model 'toy:abc', not 'ViT-B-32:openai'"):
        load_aligner(tmp_path / "a", model_fingerprint="ViT-B-32:openai")


def test_fitting_is_deterministic_and_seeded(data, full):
    fit_text, fit_image, held = data
    again = fit_aligner("anisoalign", text=fit_text, image=fit_image, seed=1, model_fingerprint="toy:abc",
                        **{**TINY, **FIXED, "stage2_lr": 0.02, "stage2_steps": 60})
    assert again.tensors.keys() == full.tensors.keys()
    for key, value in full.tensors.items():
        np.testing.assert_array_equal(again.tensors[key], value, err_msg=key)
    other = fit_aligner("anisoalign-init", text=fit_text, image=fit_image, seed=2, **TINY)
    assert not np.allclose(other.tensors["frame.mixing"], full.tensors["frame.mixing"])
    np.testing.assert_allclose(other.tensors["frame.q_u"], full.tensors["frame.q_u"])  # U itself is seed-free


@pytest.mark.parametrize("reading", ["objectives", "guidance"])
def test_ablations_under_both_readings(data, reading):
    """"objectives": the spec's objectives are stationary at the zero-initialised head, so "+ Refinement" and
    "+ L_Phi" equal the init exactly. "guidance" (default): L_G trains them, so they differ from it."""
    fit_text, fit_image, held = data
    kw = {**TINY, "stage2_lr": 0.02, "ablation_reading": reading}
    outs = {name: fit_aligner(name, text=fit_text, image=fit_image, seed=0, **kw).transform(held.text)
            for name in ("anisoalign-init", "anisoalign-refine", "anisoalign-phase", "anisoalign-prior")}
    assert np.abs(outs["anisoalign-prior"] - outs["anisoalign-init"]).max() > 1e-4
    if reading == "objectives":
        np.testing.assert_array_equal(outs["anisoalign-refine"], outs["anisoalign-init"])
        np.testing.assert_array_equal(outs["anisoalign-phase"], outs["anisoalign-init"])
    else:
        for name in ("anisoalign-refine", "anisoalign-phase"):
            assert np.abs(outs[name] - outs["anisoalign-init"]).max() > 1e-4, name
        assert np.abs(outs["anisoalign-phase"] - outs["anisoalign-refine"]).max() > 1e-6  # L_Phi changes L_G's result


def test_energy_rank_learned_mixing_and_sample_cap(data):
    fit_text, fit_image, _ = data
    a = fit_aligner("anisoalign-init", text=fit_text, image=fit_image, **{**TINY, "rank": None, "energy": 0.5,
                    "mixing": "learned", "mixing_steps": 20, "max_train_samples": 300})
    r = choose_rank(a.tensors["frame.eigenvalues"], energy=0.5)
    assert a.frame.rank == r and a.tensors["frame.basis"].shape == (16, r)
    mix = a.tensors["frame.mixing"]
    np.testing.assert_allclose(mix.T @ mix, np.eye(r), atol=1e-10)
    assert a.history["mixing_stability_val"][-1] >= a.history["mixing_stability_val"][0]
    assert a.fit_counts["text_sample"] == 300 and a.fit_counts["image_sample"] == 300


def test_bad_inputs_are_refused(data):
    fit_text, fit_image, _ = data
    with pytest.raises(ValueError, match="mixing must be one of"):
        fit_aligner("anisoalign-init", text=fit_text, image=fit_image, mixing="random")
    with pytest.raises(ValueError, match=r"rank r=5 must be an even number in \[2, 16\]"):
        fit_aligner("anisoalign-init", text=fit_text, image=fit_image, rank=5)
    with pytest.raises(ValueError, match="fitting across processes"):
        fit_aligner("anisoalign-init", text=fit_text, image=fit_image, reducer=lambda v: v)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['alpha'\]"):
        fit_aligner("anisoalign", text=fit_text, image=fit_image, alpha=0.1)
    with pytest.raises(ValueError, match="not a torch device"):
        fit_aligner("anisoalign-init", text=fit_text, image=fit_image, device="gpu0")
    with pytest.raises(ValueError, match="trains on 'cpu' or 'cuda"):
        fit_aligner("anisoalign-init", text=fit_text, image=fit_image, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device on this machine"):
            fit_aligner("anisoalign-init", text=fit_text, image=fit_image, device="cuda")
    bad = fit_text.copy()
    bad[17] *= 1.5
    with pytest.raises(ValueError, match="text: row 17 has L2 norm"):
        fit_aligner("anisoalign-init", text=bad, image=fit_image)


# ------------------------------------------------------------------------------ automatic selection
AUTO = dict(TINY, select_shrinkage=[0.0, 0.5, 1.0, [0.0, 0.5]], select_lambda_phi=[1.0], select_bound_scale=[0.05, 0.2],
            stage2_lr=0.02)


class Tracked:
    """A re-iterable source over ``rows`` of ``items`` (item ids) that records every item it yields."""

    def __init__(self, rows, items, seen):
        self.rows, self.items, self.seen = rows, items, seen

    def __call__(self):
        for start in range(0, len(self.rows), 300):
            self.seen.update(self.items[start : start + 300].tolist())
            yield self.rows[start : start + 300]


@pytest.fixture(scope="module")
def paired_world():
    pairs = make_paired_embeddings(3000, 16, gap=0.5, residual_rank=2, seed=4)
    order = np.random.default_rng(0).permutation(3000)
    return pairs, order[:1000], order[1000:2000]  # text items, image items: disjoint


@pytest.fixture(scope="module")
def auto(paired_world):
    pairs, text_items, image_items = paired_world
    seen_text, seen_image = set(), set()
    aligner = fit_aligner("anisoalign", text=Tracked(pairs.text[text_items], text_items, seen_text),
                          image=Tracked(pairs.image[image_items], image_items, seen_image), seed=2, **AUTO)
    return aligner, seen_text, seen_image


def test_auto_selection_reads_no_pair_and_keeps_the_chosen_candidate(auto, paired_world, monkeypatch):
    aligner, seen_text, seen_image = auto
    _, text_items, image_items = paired_world
    # everything it read: texts of some items, images of other items; no item was seen from both sides
    assert seen_text == set(text_items.tolist()) and seen_image == set(image_items.tolist())
    assert not seen_text & seen_image
    rows = aligner.history["selection"]
    ref = aligner.history["selection_reference"]
    # 4 closed-form candidates, then the refiner (trained at gamma*, the best feasible closed-form candidate)
    # evaluated with 2 bound scales on gamma* and the next-best feasible gammas below it (3 at most)
    init_rows = rows[:4]
    assert all(r["lambda_phi"] is None for r in init_rows)
    ok = [r for r in init_rows if r["Omega_k"] >= ref["Omega_k"] - 0.01 and r["Psi"] >= ref["Psi"] - 0.01]
    star = max(ok, key=lambda r: r["M_k_X"])["shrinkage"]
    below = [r for r in ok if r["shrinkage"][0] <= star[0] and r["shrinkage"][1] <= star[1]]
    below = sorted(below, key=lambda r: -r["M_k_X"])[:3]
    assert len(rows) == 4 + 2 * len(below)
    assert {(tuple(r["shrinkage"]), r["bound_scale"]) for r in rows[4:]} == {
        (tuple(r["shrinkage"]), b) for r in below for b in (0.05, 0.2)}
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1
    best = chosen[0]
    feasible = [r for r in rows if r["Omega_k"] >= ref["Omega_k"] - 0.01 and r["Psi"] >= ref["Psi"] - 0.01]
    assert [r["feasible"] for r in rows] == [r in feasible for r in rows]
    assert best["M_k_X"] == max(r["M_k_X"] for r in feasible)
    np.testing.assert_array_equal(aligner.tensors["init.shrinkage"], best["shrinkage"])
    assert ("refine.bounds" in aligner.tensors) == (best["lambda_phi"] is not None)
    assert "chosen" in aligner.selection_table() and "realign (reference)" in aligner.selection_table()


def test_auto_is_deterministic_for_a_seed(auto, paired_world):
    pairs, text_items, image_items = paired_world
    again = fit_aligner("anisoalign", text=Tracked(pairs.text[text_items], text_items, set()),
                        image=Tracked(pairs.image[image_items], image_items, set()), seed=2, **AUTO)
    assert again.history["selection"] == auto[0].history["selection"]
    assert again.tensors.keys() == auto[0].tensors.keys()
    for key, value in auto[0].tensors.items():
        np.testing.assert_array_equal(again.tensors[key], value, err_msg=key)


def test_auto_with_no_candidate_refinement_grid_and_too_little_data(paired_world):
    pairs, text_items, image_items = paired_world
    only_init = fit_aligner("anisoalign", text=pairs.text[text_items], image=pairs.image[image_items], seed=0,
                            **{**AUTO, "select_bound_scale": []})
    assert all(r["lambda_phi"] is None for r in only_init.history["selection"])
    assert not any(k.startswith("refiner.") for k in only_init.tensors)
    with pytest.raises(ValueError, match="select='auto' needs more than 21 held-out rows"):
        fit_aligner("anisoalign", text=pairs.text[:60], image=pairs.image[100:160], **AUTO)


def test_gamma_one_is_the_paper_variant_and_gamma_zero_is_realign(paired_world):
    pairs, text_items, image_items = paired_world
    kw = dict(text=pairs.text[text_items], image=pairs.image[image_items], seed=0)
    y = pairs.text[2000:2300]
    paper = fit_aligner("anisoalign-init", **kw, **TINY)
    gamma1 = fit_aligner("anisoalign-init", **kw, **{**TINY, "v_floor": 0.0, "shrinkage": 1.0})
    np.testing.assert_array_equal(gamma1.transform(y), paper.transform(y))
    gamma0 = fit_aligner("anisoalign-init", **kw, **{**TINY, "shrinkage": 0.0})
    realign = fit_aligner("realign", **kw)
    np.testing.assert_allclose(gamma0.transform(y), realign.transform(y), atol=2e-6)


def test_presets_fill_only_what_is_not_given():
    from anisogen.align.aniso import AnisoAlign, PRESETS

    paper = AnisoAlign(preset="paper", score_layers=2)
    assert paper.params["score_hidden"] == 1024 and paper.params["stage1_steps"] == 50_000
    assert paper.params["score_layers"] == 2  # explicit beats the preset
    assert AnisoAlign().params["score_hidden"] == PRESETS["cpu"]["score_hidden"]
    with pytest.raises(ValueError, match="preset must be one of"):
        AnisoAlign(preset="gpu")


def test_artifacts_from_before_the_change_still_load(data, tmp_path):
    """An artifact without the new parameters and tensors is the paper's map with its stored alpha's."""
    fit_text, fit_image, held = data
    old = fit_aligner("anisoalign-paper", text=fit_text, image=fit_image, seed=0, **{**TINY, "stage2_lr": 0.02,
                                                                                      "stage2_steps": 40})
    z = old.transform(held.text)
    old.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["name"] = "anisoalign"
    config["anisogen_version"] = "0.1.0"
    for key in ("preset", "select", "shrinkage", "v_floor", "bounds", "phase_normalization", "refine_v", "global_scale",
                "stage1_patience", "stage1_eval_every", "stage1_batch_size", "prior_loss", "ablation_reading",
                "bound_scale", "bound_k", "select_shrinkage", "select_lambda_phi", "select_bound_scale", "select_size",
                "select_k", "select_tolerance", "select_calibration_rows", "select_refine_top", "stage1_lr_decays",
                "stage2_max_samples", "select_pool"):
        config["params"].pop(key)
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "a" / "tensors.safetensors"))
    for key in ("init.shrinkage", "init.scales"):
        tensors.pop(key)
    save_file(tensors, str(tmp_path / "a" / "tensors.safetensors"))
    loaded = load_aligner(tmp_path / "a")
    assert loaded.params["select"] == "none" and loaded.params["shrinkage"] == 1.0 and loaded.params["refine_v"]
    np.testing.assert_array_equal(loaded.transform(held.text), z)
    # an artifact that cannot be read is refused with one clear line
    tensors.pop("frame.basis")
    save_file(tensors, str(tmp_path / "a" / "tensors.safetensors"))
    with pytest.raises(
        ValueError, match=r"cannot load this 'anisoalign' artifact \(written by anisogen 0.1.0\).*refit"
    ):
        load_aligner(tmp_path / "a")


def test_data_scaled_bounds_without_selection_solve_kappa_for_the_median_knn_distance(data):
    """select="none", bounds="data": kappa(alpha) E||c0|| = bound_scale x the median held-out text 20-NN distance."""
    from anisogen.align.aniso.refine import Bounds
    from anisogen.geometry.knn import knn_search

    fit_text, fit_image, _ = data
    a = fit_aligner("anisoalign", text=fit_text, image=fit_image, seed=0,
                    **{**TINY, "select": "none", "bound_scale": 0.3, "stage2_steps": 5})
    alpha_theta, alpha_rho, _ = a.tensors["refine.bounds"]
    assert alpha_rho == pytest.approx(0.5 * alpha_theta)
    # independent computation on the same held-out texts (the last reservoir rows) and calibration rows
    from anisogen.align.aniso.training import reservoir_sample

    texts = reservoir_sample([fit_text], a.params["max_train_samples"] + a.params["select_size"], 1, dtype=np.float32)
    held = texts[-a.fit_counts["select_sample"]:].astype(np.float64)
    kth = knn_search(held, k=20)[:, -1]
    median = np.median(np.sqrt(np.clip(2 - 2 * np.einsum("ij,ij->i", held, held[kth]), 0, None)))
    rows = texts[: a.fit_counts["text_sample"]].astype(np.float64)
    _, rho0, _ = a.init.state(rows)
    coord_norm = np.mean(np.sqrt(np.maximum(rho0**2 - 1e-8, 0).sum(-1)))
    assert Bounds(alpha_theta, alpha_rho).kappa * coord_norm == pytest.approx(0.3 * median, rel=1e-9)
