"""The registered AnisoAlign aligners: sanity reduction, bounds, determinism, artifacts, ablations."""

import json

import numpy as np
import pytest

from anisogen.align import ALIGNERS, fit_aligner, load_aligner
from anisogen.align.aniso import ANISO_VARIANTS
from anisogen.align.aniso.frame import choose_rank
from anisogen.align.aniso.polar import wrap
from anisogen.synthetic import make_paired_embeddings

TINY = dict(rank=4, score_hidden=16, score_layers=1, refiner_hidden=16, refiner_layers=1, stage1_steps=30,
            stage2_steps=30, batch_size=128, eval_every=10, log_every=10, radial_knots=256, transform_block=64,
            val_size=256)


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
                       **{**TINY, "stage2_lr": 0.02, "stage2_steps": 60})


def test_all_variants_are_registered():
    assert set(ANISO_VARIANTS) <= set(ALIGNERS)
    assert len(ANISO_VARIANTS) == 5


@pytest.mark.parametrize("name", ["anisoalign-init", "anisoalign-refine"])
def test_identity_maps_and_zero_refinement_reduce_to_anchor_renormalise_calibrate(name, data):
    fit_text, fit_image, held = data
    aligner = fit_aligner(name, text=fit_text, image=fit_image, radial_map="identity", v_scaling="identity", **TINY)
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
    assert config["fit_counts"]["text_sample"] == 1000 and config["fit_counts"]["image_sample"] == 1000
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
                        **{**TINY, "stage2_lr": 0.02, "stage2_steps": 60})
    assert again.tensors.keys() == full.tensors.keys()
    for key, value in full.tensors.items():
        np.testing.assert_array_equal(again.tensors[key], value, err_msg=key)
    other = fit_aligner("anisoalign-init", text=fit_text, image=fit_image, seed=2, **TINY)
    assert not np.allclose(other.tensors["frame.mixing"], full.tensors["frame.mixing"])
    np.testing.assert_allclose(other.tensors["frame.q_u"], full.tensors["frame.q_u"])  # U itself is seed-free


def test_stationary_ablations_equal_the_global_init_and_prior_does_not(data):
    fit_text, fit_image, held = data
    outs = {name: fit_aligner(name, text=fit_text, image=fit_image, seed=0, **{**TINY, "stage2_lr": 0.02}).transform(held.text)
            for name in ("anisoalign-init", "anisoalign-refine", "anisoalign-phase", "anisoalign-prior")}
    np.testing.assert_array_equal(outs["anisoalign-refine"], outs["anisoalign-init"])
    np.testing.assert_array_equal(outs["anisoalign-phase"], outs["anisoalign-init"])
    assert np.abs(outs["anisoalign-prior"] - outs["anisoalign-init"]).max() > 1e-4


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
    bad = fit_text.copy()
    bad[17] *= 1.5
    with pytest.raises(ValueError, match="text: row 17 has L2 norm"):
        fit_aligner("anisoalign-init", text=bad, image=fit_image)
