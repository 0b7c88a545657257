"""Generator end to end in one process: schema, rejects, resume, refusal, aligner reuse, dtypes, dedup."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_utils import LONG_ROW, make_config, manifest_core, shard_bytes, write_corpus, write_images  # noqa: E402

from anisogen.align import load_aligner  # noqa: E402
from anisogen.encode import load_clip  # noqa: E402
from anisogen.encode.text import TextEncoder  # noqa: E402
from anisogen.generate import ConfigMismatch, generate  # noqa: E402
from anisogen.generate.cli import build_parser, main as cli_main  # noqa: E402
from anisogen.shards import iter_samples, load_manifest, read_embeddings, read_rejects, verify_folder  # noqa: E402
from anisogen.shards.schema import make_key, parse_key  # noqa: E402

torch.set_num_threads(1)
SPS = 50


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A completed reference run over the standard corpus."""
    tmp = tmp_path_factory.mktemp("gen")
    expected = write_corpus(tmp / "corpus.jsonl")
    write_images(tmp / "img.npy")
    cfg = make_config(tmp, tmp / "corpus.jsonl", tmp / "img.npy")
    summary = generate(cfg)
    return {"tmp": tmp, "expected": expected, "cfg": cfg, "out": Path(cfg.out), "summary": summary}


def _cfg(world, out, **kw):
    images = kw.pop("images", world["tmp"] / "img.npy")
    return make_config(world["tmp"], world["tmp"] / "corpus.jsonl", images, out=out, **kw)


def test_every_valid_record_written_once_and_rejects_reasoned(world):
    out, expected = world["out"], world["expected"]
    s = world["summary"]
    assert s["status"] == "complete" and s["shards"] == 5 and s["num_tasks"] == 5
    assert s["samples"] == 240 - len(expected) and s["rejects"] == len(expected)
    assert verify_folder(out)["samples"] == s["samples"]
    keys = [smp["key"] for smp in iter_samples(out)]
    want = [make_key(r // SPS, r % SPS) for r in range(240) if r not in expected]
    assert keys == want  # exactly the input minus the rejects, in order, no duplicates
    rejects = read_rejects(out)
    assert {r["row"]: r["reason"] for r in rejects} == expected
    assert all(r["detail"] and r["task"] == r["row"] // SPS for r in rejects)
    m = load_manifest(out)
    assert m["totals"]["reject_reasons"] == {k: list(expected.values()).count(k) for k in set(expected.values())}
    assert sum(e["rejects"] for e in m["shards"]) == len(expected)
    assert m["config_fingerprint"] and m["model_fingerprint"].startswith("toy|random|sha256=")


def test_sample_content_matches_independent_computation(world):
    out = world["out"]
    lines = (world["tmp"] / "corpus.jsonl").read_bytes().split(b"\n")
    model, _, tok = load_clip("toy", "random")
    aligner = load_aligner(out / "aligner", model_fingerprint=model.anisogen_fingerprint)
    samples = list(iter_samples(out))
    texts = [s["text"] for s in samples]
    for s in samples:
        task, r = parse_key(s["key"])
        row = task * SPS + r
        src = json.loads(lines[row])
        assert s["text"] == src["text"] and s["meta"]["id"] == src["id"] and s["meta"]["row"] == row
        assert s["meta"]["model"] == model.anisogen_fingerprint and s["meta"]["aligner"] == "centroid"
        assert s["meta"]["truncated"] == (row == LONG_ROW)
        assert s["src"] is None and s["emb"].dtype == np.float32
    long = next(s for s in samples if s["meta"]["row"] == LONG_ROW)
    assert long["meta"]["n_tokens"] == model.context_length
    ref_tokens = tok(texts).numpy()
    assert [s["meta"]["n_tokens"] for s in samples] == (ref_tokens.argmax(1) + 1).tolist()
    # substitute = aligner(encode_text) computed the plain way
    from anisogen.encode.text import reference_encode

    raw = reference_encode(model, tok, texts, normalize=True)
    expect = aligner.transform(raw)
    got = np.stack([s["emb"] for s in samples])
    assert np.abs(got - expect).max() < 2e-3  # fp16 storage
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=2e-3)


def test_readback_with_plain_webdataset_and_tar(world):
    out = world["out"]
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    first = next(iter(ds))
    assert set(first) >= {"__key__", "txt", "emb.npy", "json"} and first["emb.npy"].shape == (128,)
    assert first["emb.npy"].dtype == np.float16 and isinstance(first["json"], dict)
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == world["summary"]["samples"]
    res = subprocess.run(["tar", "tvf", urls[0]], capture_output=True, text=True, check=True)
    assert "s000000-000000.emb.npy" in res.stdout and "1970-01-01" in res.stdout
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == world["summary"]["samples"] and len(sizes) == 5


def test_resume_repairs_partial_outputs_to_identical_bytes(world):
    ref = world["out"]
    out = world["tmp"] / "partial"
    shutil.copytree(ref, out)
    (out / "shard-000002.tar").unlink()                       # record without tar
    (out / "records" / "shard-000003.json").unlink()          # tar without record (killed after rename)
    p = out / "shard-000004.tar"                              # corrupted published tar
    data = bytearray(p.read_bytes())
    data[700] ^= 1
    p.write_bytes(bytes(data))
    (out / "shard-000001.tar.999-dead.tmp").write_bytes(b"half a tar")  # stray temp of a killed writer
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    s = generate(_cfg(world, "partial"))
    assert s["this_run"]["shards"] == 3 and s["status"] == "complete"
    assert shard_bytes(out) == shard_bytes(ref)
    assert manifest_core(out) == manifest_core(ref)
    assert not list(out.glob("*.tmp"))


def test_completed_run_reinvoked_does_no_encoding(world, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("encoding during a no-op rerun")

    monkeypatch.setattr(TextEncoder, "encode_tokenized", boom)
    before = shard_bytes(world["out"])
    s = generate(_cfg(world, "out"))
    assert s["this_run"]["shards"] == 0 and s["this_run"]["samples"] == 0 and s["status"] == "complete"
    assert shard_bytes(world["out"]) == before


def test_changed_config_is_refused_unless_overwrite(world):
    out = world["tmp"] / "changed"
    shutil.copytree(world["out"], out)
    with pytest.raises(ConfigMismatch, match="samples_per_shard"):
        generate(_cfg(world, "changed", samples_per_shard=100))
    with pytest.raises(ConfigMismatch, match="dtype"):
        generate(_cfg(world, "changed", dtype="fp32"))
    assert shard_bytes(out) == shard_bytes(world["out"])  # untouched by the refused runs
    s = generate(_cfg(world, "changed", samples_per_shard=100, overwrite=True))
    assert s["shards"] == 3 and sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert verify_folder(out)["samples"] == world["summary"]["samples"]
    # execution-only flags do not change the fingerprint
    s = generate(_cfg(world, "changed", samples_per_shard=100, workers=2, verify="size"))
    assert s["this_run"]["shards"] == 0


def test_aligner_dir_reuse_and_fingerprint_mismatch(world):
    ref = world["out"]
    s = generate(_cfg(world, "reuse", aligner=None, images=None, aligner_dir=str(ref / "aligner")))
    assert s["status"] == "complete"
    reuse = world["tmp"] / "reuse"
    assert shard_bytes(reuse) == shard_bytes(ref)  # same aligner, same bytes
    assert not (reuse / "aligner").exists() and load_manifest(reuse)["aligner"]["name"] == "centroid"
    other = world["tmp"] / "other-aligner"
    shutil.copytree(ref / "aligner", other)
    cfg_path = other / "config.json"
    conf = json.loads(cfg_path.read_text())
    conf["model_fingerprint"] = "ViT-B-32|openai|sha256=0123456789abcdef"
    cfg_path.write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="fitted for CLIP model"):
        generate(_cfg(world, "mismatch", aligner=None, images=None, aligner_dir=str(other)))
    assert not list((world["tmp"] / "mismatch").glob("shard-*.tar"))


def test_fitted_aligner_equals_independent_fit_on_seeded_sample(world):
    from anisogen.align import fit_aligner
    from anisogen.encode.text import reference_encode

    a = load_aligner(world["out"] / "aligner")
    rows = np.sort(np.random.default_rng(0).choice(240, size=120, replace=False))
    rows = [int(r) for r in rows if int(r) not in world["expected"]]
    lines = (world["tmp"] / "corpus.jsonl").read_bytes().split(b"\n")
    texts = [json.loads(lines[r])["text"] for r in rows]
    model, _, tok = load_clip("toy", "random")
    image = np.load(world["tmp"] / "img.npy").astype(np.float64)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    b = fit_aligner("centroid", text=reference_encode(model, tok, texts, normalize=True).astype(np.float64),
                    image=image, seed=0)
    assert a.fit_counts == {"text": len(rows), "image": 300}
    np.testing.assert_allclose(a.tensors["mu_text"], b.tensors["mu_text"], atol=1e-6)
    np.testing.assert_allclose(a.tensors["mu_image"], b.tensors["mu_image"], atol=1e-7)
    assert a.model_fingerprint == model.anisogen_fingerprint


def test_dtypes_and_keep_source(world):
    same = dict(aligner=None, images=None, aligner_dir=str(world["out"] / "aligner"), limit=100)
    s = generate(_cfg(world, "bf16", dtype="bf16", keep_source=True, **same))
    out = world["tmp"] / "bf16"
    assert s["samples"] == verify_folder(out)["samples"]
    ds = wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False).decode()
    raw = next(iter(ds))
    assert raw["emb.npy"].dtype == np.uint16 and raw["src.npy"].dtype == np.uint16
    emb16 = read_embeddings(out)
    src16 = read_embeddings(out, field="src")
    ref = read_embeddings(world["out"], limit=len(emb16))
    assert np.abs(emb16 - ref).max() < 5e-3  # bf16 vs fp16 storage of the same values
    generate(_cfg(world, "fp32", dtype="fp32", keep_source=True, **same))
    emb32 = read_embeddings(world["tmp"] / "fp32")
    src32 = read_embeddings(world["tmp"] / "fp32", field="src")
    assert emb32.dtype == np.float32 and np.abs(emb32 - emb16).max() < 5e-3 and np.abs(src32 - src16).max() < 5e-3
    aligner = load_aligner(world["out"] / "aligner")
    np.testing.assert_allclose(aligner.transform(src32), emb32, atol=1e-6)


def test_streaming_read_gives_identical_bytes(world):
    s = generate(_cfg(world, "stream", streaming=True))
    assert s["num_tasks"] == 5
    # the fingerprint differs (streaming is part of the config) but the bytes must not
    assert shard_bytes(world["tmp"] / "stream") == shard_bytes(world["out"])


def test_dedup_rejects_exact_duplicates(world):
    s = generate(_cfg(world, "dedup", dedup=True))
    out = world["tmp"] / "dedup"
    rejects = {r["row"]: r for r in read_rejects(out)}
    dups = {row: r for row, r in rejects.items() if r["reason"] == "duplicate"}
    expected = world["expected"]
    want = {i for i in range(200, 240) if i not in expected and (i - 200) not in expected and (i - 200) != LONG_ROW}
    assert set(dups) == want and all(r["detail"] == f"same text as row {row - 200}" for row, r in dups.items())
    assert s["samples"] == world["summary"]["samples"] - len(want)
    texts = [smp["text"] for smp in iter_samples(out)]
    assert len(texts) == len(set(texts))


def test_cli_help_documents_every_flag_and_runs(world, capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--corpus", "--aligner-dir", "--samples-per-shard", "--dtype", "--executor", "--fit-samples"):
        assert flag in text
    with pytest.raises(SystemExit):
        cli_main(["--corpus", "x.jsonl", "--out", "o"])  # no aligner: argparse error
    tmp = world["tmp"]
    rc = cli_main(["--corpus", str(tmp / "corpus.jsonl"), "--id-field", "id", "--model", "toy", "--pretrained",
                   "random",
                   "--out", str(tmp / "cli"), "--samples-per-shard", "50", "--aligner-dir",
                   str(world["out"] / "aligner"),
                   "--batch-size", "16", "--threads", "1", "--workers", "0", "--cache-dir", str(tmp / "hf-cache"),
                   "--summary-json", str(tmp / "cli-summary.json")])
    assert rc == 0
    summary = json.loads((tmp / "cli-summary.json").read_text())
    assert summary["samples"] == world["summary"]["samples"]
    out = capsys.readouterr().out
    assert "stage split" in out and "samples/s" in out
    assert shard_bytes(tmp / "cli") == shard_bytes(world["out"])
    rc = cli_main(["--corpus", str(tmp / "corpus.jsonl"), "--id-field", "id", "--model", "toy", "--pretrained",
                   "random",
                   "--out", str(tmp / "cli"), "--samples-per-shard", "60", "--aligner-dir",
                   str(world["out"] / "aligner"),
                   "--threads", "1", "--workers", "0", "--cache-dir", str(tmp / "hf-cache"), "--no-progress"])
    assert rc == 2 and "different config" in capsys.readouterr().err


def test_fit_only_then_slurm_array_workers(world):
    out = world["tmp"] / "array"
    s = generate(_cfg(world, "array", fit_only=True))
    assert s["fit_only"] and (out / "aligner" / "config.json").is_file() and not list(out.glob("shard-*.tar"))
    s0 = generate(_cfg(world, "array", worker_index=0, num_workers=2))  # tasks 0, 2, 4
    assert s0["status"] == "running" and s0["missing_tasks"] == 2 and s0["this_run"]["shards"] == 3
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar",
        "shard-000002.tar",
        "shard-000004.tar",
    ]
    s1 = generate(_cfg(world, "array", worker_index=1, num_workers=2))  # tasks 1, 3; the last one finalizes
    assert s1["status"] == "complete" and s1["this_run"]["shards"] == 2
    assert shard_bytes(out) == shard_bytes(world["out"]) and manifest_core(out) == manifest_core(world["out"])


def test_all_rejected_and_empty_corpora(world):
    tmp = world["tmp"]
    (tmp / "bad.jsonl").write_bytes(b'{"text": 1}\n\n{"x": "y"}\n')
    (tmp / "none.jsonl").write_bytes(b"")
    reuse = dict(aligner=None, aligner_dir=str(world["out"] / "aligner"), id_field=None)
    s = make_config(tmp, tmp / "bad.jsonl", None, out="bad", **reuse)
    s = generate(s)
    assert s["status"] == "complete" and s["shards"] == 1 and s["samples"] == 0 and s["rejects"] == 3
    assert verify_folder(tmp / "bad")["samples"] == 0 and len(read_rejects(tmp / "bad")) == 3
    s = generate(make_config(tmp, tmp / "none.jsonl", None, out="none", **reuse))
    assert s["status"] == "complete" and s["shards"] == 0 and load_manifest(tmp / "none")["num_tasks"] == 0
    with pytest.raises(ValueError, match="no valid texts"):
        generate(make_config(tmp, tmp / "bad.jsonl", tmp / "img.npy", out="badfit", id_field=None))
