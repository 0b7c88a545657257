"""Image embedding: folders, WebDataset image tars, precomputed .npy (clip-retrieval layout), the CLI."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from anisogen.encode import load_clip
from anisogen.encode.images import (
    embed_images, image_source_kind, load_image_embeddings, load_npy_embeddings,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _load_cli():
    from anisogen.commands import embed_images

    return embed_images


@pytest.fixture(scope="module")
def toy():
    return load_clip("toy", "random")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _direct(model, preprocess, imgs):
    with torch.inference_mode():
        x = torch.stack([preprocess(im.convert("RGB")) for im in imgs])
        return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).numpy()


def test_folder_matches_direct_encode_image_and_skips_corrupt(tmp_path, toy):
    model, preprocess, _ = toy
    imgs = _images(5)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(imgs):
        im.save(folder / ("sub" if i == 4 else "") / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert image_source_kind(folder) == "folder"
    emb, keys, failures = embed_images(folder, model, preprocess, batch_size=2)
    assert [Path(k).name for k in keys] == ["im0.png", "im1.png", "im2.png", "im3.png", "im4.png"]
    assert len(failures) == 1 and failures[0][0].endswith("broken.jpg")
    np.testing.assert_allclose(emb, _direct(model, preprocess, imgs), atol=1e-5)
    assert emb.dtype == np.float32
    assert load_image_embeddings(folder, model=model, preprocess=preprocess, limit=3).shape == (3, emb.shape[1])


def test_webdataset_image_shards(tmp_path, toy):
    model, preprocess, _ = toy
    imgs = _images(4, seed=1)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"img-{s}.tar")) as tw:
            for i in range(2):
                buf = io.BytesIO()
                imgs[2 * s + i].save(buf, format="PNG")
                tw.write({"__key__": f"k{2 * s + i}", "png": buf.getvalue(), "txt": "caption"})
    assert image_source_kind(tmp_path / "img-*.tar") == "shards" and image_source_kind(tmp_path) == "shards"
    emb, keys, _ = embed_images(tmp_path / "img-*.tar", model, preprocess, batch_size=3)
    assert [k.split(":")[-1] for k in keys] == ["k0", "k1", "k2", "k3"]
    np.testing.assert_allclose(emb, _direct(model, preprocess, imgs), atol=1e-5)


def test_precomputed_npy_natural_order_and_validation(tmp_path):
    d = tmp_path / "img_emb"
    d.mkdir()
    rng = np.random.default_rng(0)
    parts = {i: rng.standard_normal((3, 8)).astype(np.float16) for i in (0, 1, 2, 10)}
    for i, a in parts.items():
        np.save(d / f"img_emb_{i}.npy", a)
    got = load_npy_embeddings(d)
    want = np.concatenate([parts[i] for i in (0, 1, 2, 10)]).astype(np.float64)  # _10 after _2
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert image_source_kind(d) == "npy" and load_npy_embeddings(d, limit=4).shape == (4, 8)
    np.save(d / "img_emb_11.npy", np.full((2, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_npy_embeddings(d)


def test_cli_writes_outputs_and_refuses_other_model(tmp_path, toy, capsys):
    model, preprocess, _ = toy
    folder = tmp_path / "imgs"
    folder.mkdir()
    imgs = _images(3, seed=2)
    for i, im in enumerate(imgs):
        im.save(folder / f"a{i}.jpg", quality=95)
    cli = _load_cli()
    assert cli.main(["--images", str(folder), "--model", "toy", "--pretrained", "random", "--out",
                     str(tmp_path / "emb"),
                     "--workers", "0", "--no-progress"]) == 0
    assert "3 image embeddings" in capsys.readouterr().out
    emb = np.load(tmp_path / "emb" / "img_emb.npy")
    meta = json.loads((tmp_path / "emb" / "img_emb.json").read_text())
    assert emb.shape == (3, 128) and meta["model"] == model.anisogen_fingerprint and meta["count"] == 3
    assert len((tmp_path / "emb" / "img_keys.txt").read_text().splitlines()) == 3
    # the output folder is a valid --images source for the same model, refused for another one
    np.testing.assert_allclose(load_image_embeddings(tmp_path / "emb", model_fingerprint=model.anisogen_fingerprint),
                               emb, atol=1e-6)
    with pytest.raises(ValueError, match="computed with"):
        load_image_embeddings(tmp_path / "emb", model_fingerprint="ViT-B-32|openai|sha256=0")
