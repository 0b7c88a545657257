"""load_clip / clip_fingerprint: bundled toy weights, seeded random init, local checkpoints, offline errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anisogen.encode import TOY_WEIGHTS, clip_fingerprint, embed_dim, load_clip, weights_digest
from anisogen.toyworld import render, sample_scenes
from anisogen.toyworld.quality import pixels_to_tensor


@pytest.fixture(scope="module")
def random_toy():
    return load_clip("toy", pretrained="random", seed=3)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_open_clip_knows_toy_after_import():
    import open_clip

    import anisogen  # noqa: F401

    assert "toy" in open_clip.list_models()
    model = open_clip.create_model("toy")
    assert embed_dim(model) == 128


def test_random_init_is_seeded(random_toy):
    model, _, _ = random_toy
    again, _, _ = load_clip("toy", pretrained="random", seed=3)
    other, _, _ = load_clip("toy", pretrained="random", seed=4)
    assert _same_weights(model, again)
    assert not _same_weights(model, other)
    assert model.anisogen_fingerprint == again.anisogen_fingerprint
    assert model.anisogen_fingerprint != other.anisogen_fingerprint
    assert model.anisogen_fingerprint.startswith("toy|random|sha256=")


def test_fingerprint_tracks_weights(random_toy):
    model, _, _ = random_toy
    before = clip_fingerprint(model, "toy", "random")
    assert before == model.anisogen_fingerprint
    saved = model.text_projection.detach().clone()
    with torch.no_grad():
        model.text_projection[0, 0] += 1.0
    try:
        assert clip_fingerprint(model, "toy", "random") != before
    finally:
        with torch.no_grad():
            model.text_projection.copy_(saved)
    assert clip_fingerprint(model, "toy", "random") == before


def test_local_safetensors_checkpoint_roundtrip(tmp_path, random_toy):
    source, _, _ = random_toy
    path = tmp_path / "my_clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model, preprocess, tokenizer = load_clip("toy", pretrained=path)
    assert _same_weights(model, source)
    fp = model.anisogen_fingerprint
    assert fp.startswith("toy|file:my_clip.safetensors|sha256=")
    # the weight hash does not depend on where the weights came from
    assert fp.split("|")[-1] == source.anisogen_fingerprint.split("|")[-1]
    assert fp == clip_fingerprint(model, "toy", str(path))


def test_local_torch_checkpoint_with_wrapper_and_prefix(tmp_path, random_toy):
    source, _, _ = random_toy
    path = tmp_path / "epoch_1.pt"
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, path)
    model, _, _ = load_clip("toy", pretrained=str(path))
    assert _same_weights(model, source)
    assert model.anisogen_fingerprint.startswith("toy|file:epoch_1.pt|")


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("unpickled!",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_clip("toy", pretrained=str(path))


def test_mismatched_checkpoint_names_file(tmp_path, random_toy):
    source, _, _ = random_toy
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "text_projection"}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="partial.safetensors"):
        load_clip("toy", pretrained=path)


def test_bad_requests_have_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip("toy", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(IsADirectoryError):
        load_clip("toy", pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("no-such-model", pretrained="random")
    with pytest.raises(RuntimeError, match="'toy'.*pretrained='laion2b'"):
        load_clip("toy", pretrained="laion2b")


def test_missing_bundled_weights_error(monkeypatch, tmp_path):
    import anisogen.encode.clip as clip_mod

    monkeypatch.setattr(clip_mod, "TOY_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="pretrained='random'"):
        load_clip("toy")


def test_bundled_toy_loads_offline_with_stable_fingerprint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert TOY_WEIGHTS.is_file() and TOY_WEIGHTS.stat().st_size <= 25 * 2**20
    model, preprocess, tokenizer = load_clip("toy")
    assert not model.training
    assert model.anisogen_fingerprint.startswith("toy|bundled|sha256=")
    assert model.anisogen_fingerprint == clip_fingerprint(model, "toy", None)
    assert load_clip("toy", pretrained="bundled")[0].anisogen_fingerprint == model.anisogen_fingerprint
    # float16 storage: casting the fp32 model to fp16 and back leaves the weight hash unchanged
    digest = weights_digest(model)
    assert weights_digest(model.half()) == digest
    model.float()
    assert next(model.parameters()).dtype == torch.float32

    scene = sample_scenes(1, "heldout", 0)[0]
    image = render(scene)
    x = preprocess(image)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, pixels_to_tensor(np.asarray(image)[None])[0], atol=1e-6, rtol=0)
    tokens = tokenizer(["a red star", "a photo of a blue object"])
    assert tokens.shape == (2, 48) and tokens.dtype == torch.long
    with torch.no_grad():
        t = model.encode_text(tokens)
        i = model.encode_image(x[None])
    assert t.shape == (2, 128) and i.shape == (1, 128)
    assert torch.isfinite(t).all() and torch.isfinite(i).all()
