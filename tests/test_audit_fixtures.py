"""Builders of audit inputs (shard folders, image .npy, paired .npz) shared by the test_audit_* files.

Shard folders are written through the generator's own writer (:mod:`anisogen.shards`), so the audit is
tested on exactly the on-disk format the generator produces; the test in this file checks that with the
shards package's own verifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from anisogen.align import fit_aligner
from anisogen.audit import write_embeddings_npy
from anisogen.shards import make_key, verify_folder
from anisogen.shards import writer
from anisogen.shards.schema import encode_embedding, fingerprint, sample_members
from anisogen.synthetic import make_paired_embeddings

FP = "toy|test|sha256=0123456789abcdef"
OTHER_FP = "ViT-B-32|openai|sha256=fedcba9876543210"


def write_shard_folder(path, emb, src=None, *, model=FP, aligner=None, aligner_name="identity",
                       samples_per_shard=100, dtype="fp16", override=None, sample_models=None) -> Path:
    """A complete generated shard folder at ``path`` holding rows ``emb`` (and ``src``) in order.

    ``aligner``: a fitted Aligner saved as the folder's ``aligner/`` artifact (optional).
    ``override``: {row: array} stored verbatim as that row's ``emb.npy`` (to plant bad samples).
    ``sample_models``: {row: fingerprint} written into that row's ``json`` instead of ``model``.
    """
    override = override or {}
    sample_models = sample_models or {}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    emb = np.asarray(emb, dtype=np.float32)
    n, d = emb.shape
    records = {}
    for task, start in enumerate(range(0, n, samples_per_shard)):
        stop = min(n, start + samples_per_shard)
        emb_store = encode_embedding(emb[start:stop], dtype)
        src_store = None if src is None else encode_embedding(np.asarray(src[start:stop], dtype=np.float32), dtype)

        def samples(task=task, start=start, stop=stop, emb_store=emb_store, src_store=src_store):
            for i in range(stop - start):
                meta = {"id": str(start + i), "row": start + i, "n_tokens": 7, "truncated": False,
                        "model": sample_models.get(start + i, model), "aligner": aligner_name}
                yield sample_members(make_key(task, i), f"text {start + i}", override.get(start + i, emb_store[i]),
                                     meta,
                                     None if src_store is None else src_store[i])

        entry = writer.write_shard(out, task, samples())
        record = {**entry, "rows": [start, stop], "rejects": 0, "reject_reasons": {}, "reject_list": [],
                  "stats": {}}
        writer.write_record(out, record)
        records[task] = record
    aligner_fp = None
    if aligner is not None:
        aligner.save(out / "aligner")
        aligner_fp = fingerprint(aligner.config())
    config = {"test": True, "n": n}
    header = {"config": config, "config_fingerprint": fingerprint(config), "model_fingerprint": model,
              "aligner": {"name": aligner_name, "fingerprint": aligner_fp}, "dim": d, "dtype": dtype,
              "keep_source": src is not None, "samples_per_shard": samples_per_shard,
              "num_tasks": len(records), "input_rows": n}
    writer.assemble(out, header, records, complete=True)
    return out


def make_world(tmp_path, *, n=2400, d=32, seed=0, aligners=("centroid", "realign"), keep_source=True,
               model=FP) -> dict:
    """A small synthetic world on disk: unpaired images (.npy + sidecar), one shard folder per aligner
    (substitutes of a text corpus, with ``src.npy``), a paired held-out set (.npz + sidecar).

    Returns the paths and the arrays (``images``, ``corpus``, ``heldout``, ``substitutes`` per aligner).
    """
    pairs = make_paired_embeddings(n, d, gap=0.4, residual_rank=3, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    third = n // 3
    fit_text, images, rest = pairs.text[order[:third]], pairs.image[order[third : 2 * third]], order[2 * third :]
    corpus = fit_text  # the texts turned into shards (unpaired with the images)
    held_image, held_text = pairs.image[rest], pairs.text[rest]
    image_path = write_embeddings_npy(tmp_path / "images.npy", images.astype(np.float32), model_fingerprint=model,
                                      kind="image")
    paired_path = tmp_path / "heldout.npz"
    np.savez(paired_path, image=held_image.astype(np.float32), text=held_text.astype(np.float32))
    (tmp_path / "heldout.json").write_text(json.dumps({"model": model}))
    folders, subs, fitted = {}, {}, {}
    for name in aligners:
        al = fit_aligner(name, text=fit_text, image=images, seed=seed, model_fingerprint=model)
        z = al.transform(corpus)
        folders[name] = write_shard_folder(tmp_path / f"shards_{name}", z, corpus if keep_source else None,
                                           model=model, aligner=al, aligner_name=name)
        subs[name] = z
        fitted[name] = al
    return {"images_path": image_path, "paired_path": paired_path, "folders": folders, "images": images,
            "corpus": corpus, "held_image": held_image, "held_text": held_text, "substitutes": subs,
            "aligners": fitted}


def test_fixture_folders_are_valid_generator_output(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((250, 16))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    folder = write_shard_folder(tmp_path / "s", z, z, samples_per_shard=100)
    assert verify_folder(folder) == {"shards": 3, "samples": 250, "keys": 250}
