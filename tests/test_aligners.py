"""The closed-form aligners and the shared interface (fit / transform / save / load)."""

import json

import numpy as np
import pytest

from anisogen.align import ALIGNERS, C3_ORIGINAL_SIGMA, fit_aligner, load_aligner
from anisogen.align.c3 import row_noise
from anisogen.synthetic import make_paired_embeddings
from conftest import unit_rows

CLOSED_FORM = ["identity", "centroid", "unicorn", "c3", "realign"]


@pytest.fixture(scope="module")
def data():
    pairs = make_paired_embeddings(16000, 32, gap=0.5, residual_rank=2, seed=11)
    fit_text, fit_image, held = pairs.split(8000, seed=0, keep_antithetic=True)
    return fit_text, fit_image, held


def _l2(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_registry_has_the_required_names():
    assert set(CLOSED_FORM) <= set(ALIGNERS)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_outputs_are_unit_float32_and_row_wise(name, data):
    fit_text, fit_image, held = data
    aligner = fit_aligner(name, text=fit_text, image=fit_image, seed=3)
    z = aligner.transform(held.text)
    assert z.dtype == np.float32 and z.shape == held.text.shape
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    # batch independence: rows transformed alone or in a different batch give identical bits
    np.testing.assert_array_equal(aligner.transform(held.text[5:9]), z[5:9])
    np.testing.assert_array_equal(aligner.transform(held.text, batch_size=333), z)
    assert aligner.fit_counts == {"text": len(fit_text), "image": len(fit_image)}


def test_centroid_and_unicorn_formulas(data):
    fit_text, fit_image, held = data
    mu_t, mu_i = fit_text.mean(0), fit_image.mean(0)
    z = fit_aligner("centroid", text=fit_text, image=fit_image).transform(held.text)
    np.testing.assert_allclose(z, _l2(held.text - mu_t + mu_i), atol=1e-6)
    uni = fit_aligner("unicorn", text=fit_text, image=fit_image)
    np.testing.assert_allclose(uni.transform(held.text), _l2(held.text - mu_t), atol=1e-6)
    np.testing.assert_allclose(uni.transform_image(held.image), _l2(held.image - mu_i), atol=1e-6)


def test_realign_matches_independent_recipe(data):
    fit_text, fit_image, held = data
    mu_t, mu_i = fit_text.mean(0), fit_image.mean(0)
    tr_t = np.mean(np.sum((fit_text - mu_t) ** 2, 1))
    tr_i = np.mean(np.sum((fit_image - mu_i) ** 2, 1))
    s = np.sqrt(tr_i / (tr_t + 1e-10))
    mu_hat = _l2(mu_i + s * (fit_text - mu_t)).mean(0)
    expected = _l2(_l2(mu_i + s * (held.text - mu_t)) - mu_hat + mu_i)
    aligner = fit_aligner("realign", text=fit_text, image=fit_image)
    np.testing.assert_allclose(aligner.transform(held.text), expected, atol=1e-6)
    assert aligner.tensors["scale"][0] == pytest.approx(s, rel=1e-12)
    np.testing.assert_allclose(aligner.tensors["mu_hat"], mu_hat, atol=1e-14)


def test_realign_output_mean_hits_the_image_centroid_on_heldout_text():
    # uneven spreads (scale != 1) and a held-out set with exact planted means
    pairs = make_paired_embeddings(40000, 24, gap=0.6, residual_rank=3, residual_strength=2.0, noise=0.1, seed=2)
    fit_text, fit_image, held = pairs.split(20000, seed=1, keep_antithetic=True)
    aligner = fit_aligner("realign", text=fit_text, image=fit_image)
    z = aligner.transform(held.text).astype(np.float64)
    mu_i = pairs.truth["cos_phi"] * pairs.truth["anchor_image"]
    assert np.linalg.norm(z.mean(0) - mu_i) < 1e-3
    assert np.linalg.norm(held.text.mean(0) - mu_i) > 0.5  # the raw text was far away


def test_realign_on_a_random_split_is_within_sampling_error():
    pairs = make_paired_embeddings(60000, 16, gap=0.5, seed=4)
    fit_text, fit_image, held = pairs.split(40000, seed=2)
    z = fit_aligner("realign", text=fit_text, image=fit_image).transform(held.text).astype(np.float64)
    mu_i = pairs.truth["cos_phi"] * pairs.truth["anchor_image"]
    # standard error of a mean of 20000 unit vectors with this spread, times 4
    bound = 4 * np.sqrt(np.trace(np.cov(z.T)) / len(z)) + 4 * np.sqrt(np.trace(np.cov(fit_image.T)) / len(fit_image))
    assert np.linalg.norm(z.mean(0) - mu_i) < bound


def test_c3_noise_is_deterministic_per_row_and_sigma_is_configurable(data):
    fit_text, fit_image, held = data
    c3 = fit_aligner("c3", text=fit_text, image=fit_image, seed=7)
    assert c3.tensors["sigma"][0] == pytest.approx(C3_ORIGINAL_SIGMA)
    z = c3.transform(held.text)
    np.testing.assert_array_equal(z[10:20], c3.transform(held.text[10:20]))
    expected = _l2(held.text - fit_text.mean(0) + fit_image.mean(0) + C3_ORIGINAL_SIGMA * row_noise(held.text, 7))
    np.testing.assert_allclose(z, expected, atol=1e-6)
    other_seed = fit_aligner("c3", text=fit_text, image=fit_image, seed=8).transform(held.text[:10])
    assert not np.allclose(other_seed, z[:10])
    # noise norm ~ sigma * sqrt(d)
    noise = row_noise(held.text[:2000], 7)
    assert np.linalg.norm(noise, axis=1).mean() == pytest.approx(np.sqrt(32), rel=0.02)


def test_c3_calibration_reaches_the_target_phi(data):
    fit_text, fit_image, held = data
    c3 = fit_aligner("c3", text=fit_text, image=fit_image, calibrate_phi=0.6)
    z = c3.transform(fit_text[:4096])
    assert np.mean(np.sum(fit_text[:4096] * z, 1)) == pytest.approx(0.6, abs=1e-6)
    with pytest.raises(ValueError, match="calibrate_phi=0.99 is unreachable"):
        fit_aligner("c3", text=fit_text, image=fit_image, calibrate_phi=0.99)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_save_load_transform_is_bit_identical(name, data, tmp_path):
    fit_text, fit_image, held = data
    aligner = fit_aligner(name, text=fit_text, image=fit_image, seed=5, model_fingerprint="toy:abc")
    aligner.save(tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["name"] == name and config["dim"] == 32 and config["seed"] == 5
    assert config["model_fingerprint"] == "toy:abc" and config["fit_counts"]["image"] == len(fit_image)
    assert "anisogen_version" in config
    assert not list((tmp_path / name).glob("*.pkl"))
    loaded = load_aligner(tmp_path / name, model_fingerprint="toy:abc", dim=32)
    np.testing.assert_array_equal(loaded.transform(held.text), aligner.transform(held.text))


def test_load_refuses_wrong_fingerprint_or_dimension(data, tmp_path):
    fit_text, fit_image, _ = data
    fit_aligner("realign", text=fit_text, image=fit_image, model_fingerprint="toy:abc").save(tmp_path / "a")
    with pytest.raises(ValueError, match="fitted for CLIP model 'toy:abc', not 'ViT-B-32:openai"):
        load_aligner(tmp_path / "a", model_fingerprint="ViT-B-32:openai:123")
    with pytest.raises(ValueError, match="fitted for d=32, but the embeddings have d=64"):
        load_aligner(tmp_path / "a", dim=64)
    with pytest.raises(FileNotFoundError, match="not an aligner artifact"):
        load_aligner(tmp_path / "missing")
    loaded = load_aligner(tmp_path / "a")
    with pytest.raises(ValueError, match="text: dimension mismatch, expected d=32, got d=16"):
        loaded.transform(unit_rows(np.random.default_rng(0), 4, 16))


def test_streaming_fit_equals_in_memory_fit(data):
    fit_text, fit_image, held = data
    chunks = lambda a: (lambda: (a[s : s + 999] for s in range(0, len(a), 999)))  # noqa: E731
    streamed = fit_aligner("realign", text=chunks(fit_text), image=chunks(fit_image))
    whole = fit_aligner("realign", text=fit_text, image=fit_image)
    np.testing.assert_allclose(streamed.transform(held.text), whole.transform(held.text), atol=1e-6)


class ThreadAllReduce:
    """A SUM all-reduce between threads, standing in for torch.distributed across ranks."""

    def __init__(self, world_size):
        import threading

        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size
        self.calls = 0

    def for_rank(self, rank):
        def reduce(vec):
            self.slots[rank] = vec.copy()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return total

        return reduce


def test_reducer_makes_ranks_agree(data):
    """Two ranks, each fitting on half of the data, all-reduce their sums and agree with one process."""
    from concurrent.futures import ThreadPoolExecutor

    fit_text, fit_image, held = data
    texts, images = np.array_split(fit_text, 2), np.array_split(fit_image, 2)
    comm = ThreadAllReduce(2)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(fit_aligner, "realign", text=texts[r], image=images[r], reducer=comm.for_rank(r))
                   for r in range(2)]
        ranks = [f.result() for f in futures]
    whole = fit_aligner("realign", text=fit_text, image=fit_image)
    assert comm.calls == 3  # text moments, image moments, calibration mean
    for aligner in ranks:
        assert aligner.fit_counts == whole.fit_counts
        for key in ("mu_text", "mu_image", "scale", "mu_hat"):
            np.testing.assert_allclose(aligner.tensors[key], whole.tensors[key], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(ranks[0].transform(held.text), ranks[1].transform(held.text))
    np.testing.assert_allclose(ranks[0].transform(held.text), whole.transform(held.text), atol=1e-6)


def test_unknown_names_and_params_are_refused(data):
    fit_text, fit_image, _ = data
    with pytest.raises(ValueError, match="unknown aligner 'nope'; registered: "):
        fit_aligner("nope", text=fit_text, image=fit_image)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sigmaa'\]"):
        fit_aligner("c3", text=fit_text, image=fit_image, sigmaa=0.1)
    with pytest.raises(ValueError, match="dimension mismatch between inputs: text d=32, image d=16"):
        fit_aligner("identity", text=fit_text, image=_l2(fit_image[:, :16]))
    bad = fit_text.copy()
    bad[123] *= 3
    with pytest.raises(ValueError, match="text: row 123 has L2 norm"):
        fit_aligner("realign", text=bad, image=fit_image)
    with pytest.raises(RuntimeError, match="not fitted"):
        ALIGNERS["realign"]().transform(fit_text)
