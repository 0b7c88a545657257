"""End to end: pipelines/audit.py on shard folders written by the generator's writer.

Checks the report files (JSON content, PNGs that decode, an HTML page that references every PNG), that
the reported metrics equal direct calls on the loaded arrays, the gate exit codes, and bad input at the
CLI level.
"""

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anisogen.align import load_aligner
from anisogen.audit import evaluate_gates, parse_gate
from anisogen.audit.gates import GateError
from anisogen.audit.loading import load_images, load_paired, load_shard_folder
from anisogen.audit.metrics import paired_metrics, semantic_metrics, unit_rows, unpaired_metrics
from anisogen.commands import audit as audit_cli
from test_audit_fixtures import OTHER_FP, make_world, write_shard_folder

ROOT = Path(__file__).resolve().parents[1]

FAST = ["--n-pairs", "5000", "--no-progress", "--workers", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n=1800, d=24)


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = ["--shards", str(world["folders"]["centroid"]), "--shards", str(world["folders"]["realign"]),
            "--images", str(world["images_path"]), "--paired", str(world["paired_path"]), "--out", str(out),
            "--source-baseline", "--fail-if", "delta_mu>0.05", "--fail-if", "M_k_Z < 0.2", "--k", "10", *FAST]
    code = audit_cli.main(argv)
    return code, out, json.loads((out / "report.json").read_text(), parse_constant=_no_nan)


def _no_nan(token):
    raise AssertionError(f"report.json is not strict JSON: {token}")


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.tables, self.best, self.stack = [], [], 0, 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("table", "tr", "td", "th", "a", "figure", "dl", "div", "ul", "li", "h1", "h2", "h3", "p", "b",
                   "code", "sub", "sup", "dt", "dd", "figcaption", "html", "head", "body", "title", "style"):
            self.stack.append(tag)
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "a":
            self.links.append(attrs.get("href"))
        if tag == "table":
            self.tables += 1
        if tag == "td" and "best" in (attrs.get("class") or ""):
            self.best += 1

    def handle_endtag(self, tag):
        if tag == "img" or tag == "meta":
            return
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def test_report_files_exist_and_pngs_decode(full_run):
    code, out, report = full_run
    assert code == 0
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["covariance_spectrum.png", "knn_mixing.png", "pairwise_cosines.png", "pca.png",
                    "residual_spectrum.png"]
    assert sorted(Path(p).name for p in report["plots"]) == pngs
    for name in pngs:
        with Image.open(out / "plots" / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
    assert not (out / "rejects.jsonl").exists()


def test_html_is_well_formed_and_embeds_every_png(full_run):
    _, out, report = full_run
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    referenced = {img["data-file"] for img in parser.imgs}
    assert referenced == {f"plots/{p.name}" for p in (out / "plots").glob("*.png")}
    for img in parser.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]) == (out / img["data-file"]).read_bytes()
        assert img["data-file"] in parser.links
    assert parser.tables == 2 and parser.best >= 10
    for label in ("centroid", "realign", "source text", "text (no align)"):
        assert label in page
    assert "All 2 gate(s) passed" in page and report["model_fingerprint"] in page


def test_report_json_holds_inputs_fingerprints_versions_and_index(full_run, world):
    _, _, report = full_run
    assert report["complete"] is True and report["format"] == "anisogen-audit"
    assert report["model_fingerprint"] == world["aligners"]["centroid"].model_fingerprint
    assert report["images"]["n_sampled"] == len(world["images"]) and report["d"] == 24
    labels = [f["label"] for f in report["folders"]]
    assert labels == ["shards_centroid", "shards_realign", "source text (shards_centroid)", "text (no align), paired"]
    for f in report["folders"][:2]:
        assert f["n_sampled"] == f["n_total"] == len(world["corpus"]) and f["has_src"]
        assert f["aligner"]["name"] in ("centroid", "realign") and f["aligner"]["fingerprint"]
        assert f["manifest"]["num_shards"] == 6
        assert f["knn"]["mixing"]["kind"] == "flat" and f["knn"]["mixing"]["recall"] == 1.0
        assert f["knn"]["source"]["n_base"] == len(world["corpus"])
    assert report["paired"]["n_sampled"] == len(world["held_image"])
    assert set(report["versions"]) >= {"anisogen", "numpy", "faiss", "torch", "python"}
    assert report["settings"]["k"] == 10 and report["gates"]["passed"]
    assert set(report["timings"]) >= {"scan", "knn", "metrics", "paired", "plots", "total", "scan_steps"}
    assert set(report["timings"]["scan_steps"]["images"]) == {"read", "moments"}
    assert report["settings"]["verify"] == "sample" and report["settings"]["workers"] >= 1
    assert len(report["curves"]["covariance_spectrum"]["images"]) == 24


def test_reported_metrics_equal_direct_calls_on_the_loaded_arrays(full_run, world):
    _, _, report = full_run
    images = load_images(world["images_path"])
    x = unit_rows(images.emb, "x")
    folder = load_shard_folder(world["folders"]["realign"])
    z, y = unit_rows(folder.emb, "z"), unit_rows(folder.src, "y")
    row = next(f for f in report["folders"] if f["label"] == "shards_realign")["metrics"]
    direct = {
        **unpaired_metrics(x, z, k=10, seed=0, n_pairs=5000),
        **semantic_metrics(y, z, k=10, seed=0, n_pairs=5000),
    }
    for key in ("delta_mu", "G_Sigma", "C_lambda", "O_q", "JS_cos", "M_k_Z", "M_k_X", "nn_is_image_frac_Z", "Phi",
                "Psi", "Omega_k"):
        assert row[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
    p_img, p_txt = load_paired(world["paired_path"])
    aligner = load_aligner(world["folders"]["realign"] / "aligner")
    paired = paired_metrics(unit_rows(p_img.emb, "xi"), unit_rows(p_txt.emb, "yi"), aligner, k=10, seed=0, n_pairs=5000)
    for key in ("Phi", "Psi", "Omega_k", "delta_mu", "M_k_Z", "M_k_X", "A_r_T"):
        assert row[f"paired_{key}"] == pytest.approx(paired[key], rel=1e-9), key
    baseline = next(f for f in report["folders"] if f["label"].startswith("source text"))["metrics"]
    assert baseline["delta_mu"] > 0.3 > row["delta_mu"] * 10  # raw text sits ~0.4 away; the aligner closes it


def test_gate_failure_exits_1_with_a_clear_message(world, tmp_path):
    cmd = [sys.executable, str(ROOT / "pipelines" / "audit.py"), "--shards", str(world["folders"]["centroid"]),
           "--images", str(world["images_path"]), "--out", str(tmp_path / "r"), "--k", "10",
           "--fail-if", "M_k_Z>0.05", "--fail-if", "delta_mu>0.05", *FAST]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    )
    assert proc.returncode == 1, proc.stderr
    assert "GATE FAILED [shards_centroid] M_k_Z>0.05: M_k_Z = 0." in proc.stderr
    assert "delta_mu>0.05" not in proc.stderr  # that gate passed
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not report["gates"]["passed"] and [f["metric"] for f in report["gates"]["failures"]] == ["M_k_Z"]
    assert "Gates failed" in (tmp_path / "r" / "report.html").read_text()


def test_unusable_gates_exit_2_before_any_work(world, tmp_path, capsys):
    base = ["--shards", str(world["folders"]["centroid"]), "--images", str(world["images_path"]),
            "--out", str(tmp_path / "r"), *FAST]
    assert audit_cli.main([*base, "--fail-if", "delta_nu>0.05"]) == 2
    assert "unknown metric 'delta_nu'; known metrics: " in capsys.readouterr().err
    assert audit_cli.main([*base, "--fail-if", "delta_mu>>0.05"]) == 2
    assert "cannot parse --fail-if 'delta_mu>>0.05'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.json").exists()


def test_gate_logic():
    g = parse_gate(" M_k^Z <= 0.3 ", ["M_k_Z"])
    assert (g.metric, g.op, g.threshold) == ("M_k_Z", "<=", 0.3)
    assert g.fails(0.3) and not g.fails(0.31) and g.fails(float("nan")) and g.fails(None)
    result = evaluate_gates([parse_gate("delta_mu>1e-2"), parse_gate("Phi<0.9")],
                            {"a": {"delta_mu": 0.02, "Phi": 0.95}, "b": {"delta_mu": 0.001}})
    assert [(f["folder"], f["metric"]) for f in result["failures"]] == [("a", "delta_mu"), ("b", "Phi")]
    assert "not available" in result["failures"][1]["message"]
    with pytest.raises(GateError):
        parse_gate("Phi")


def test_missing_shard_exits_2_and_skip_corrupt_reports_it(world, tmp_path, capsys):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(world["folders"]["centroid"], folder)
    (folder / "shard-000002.tar").unlink()
    out = tmp_path / "r"
    base = ["--shards", str(folder), "--images", str(world["images_path"]), "--out", str(out), "--k", "10", *FAST]
    assert audit_cli.main(base) == 2
    err = capsys.readouterr().err
    assert "broken/shard-000002.tar: shard listed in the manifest is missing; pass --skip-corrupt" in err
    assert not (out / "report.json").exists()
    assert audit_cli.main([*base, "--skip-corrupt"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and report["skipped_total"] == 1
    assert report["folders"][0]["n_total"] == len(world["corpus"]) - 100
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"key": None, "reason": "shard listed in the manifest is missing", "shard": "shard-000002.tar",
                        "source": str(folder)}]
    assert "Incomplete input" in (out / "report.html").read_text()


def test_other_model_and_missing_aligner_exit_2(world, tmp_path, capsys):
    other = write_shard_folder(tmp_path / "other", world["substitutes"]["centroid"], model=OTHER_FP)
    base = ["--images", str(world["images_path"]), "--out", str(tmp_path / "r"), *FAST]
    assert audit_cli.main(["--shards", str(world["folders"]["centroid"]), "--shards", str(other), *base]) == 2
    assert "different CLIP models, refusing to compare them" in capsys.readouterr().err
    no_aligner = write_shard_folder(tmp_path / "noal", world["substitutes"]["centroid"],
                                    model=world["aligners"]["centroid"].model_fingerprint)
    assert audit_cli.main(["--shards", str(no_aligner), "--paired", str(world["paired_path"]), *base]) == 2
    assert "noal: cannot use its aligner artifact for --paired" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        audit_cli.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--shards", "--labels", "--images", "--paired", "--out", "--limit", "--paired-max-samples",
                 "--seed", "--skip-corrupt", "--k", "--q", "--n-pairs", "--n-permutations", "--source-baseline",
                 "--index", "--device", "--nlist", "--nprobe", "--recall-target", "--recall-sample", "--threads",
                 "--fail-if", "--no-progress"):
        assert flag in text, flag
    assert "Exit status: 0" in text


def test_audit_reads_real_generator_output(tmp_path, capsys):
    """pipelines/generate.py's library entry point (toy CLIP, centroid aligner, --keep-source) -> audit."""
    import torch

    from anisogen.generate import GenerateConfig, generate

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    words = "a red blue green cube sphere cone small large on left right of the near far".split()
    lines = [json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words, rng.integers(3, 12)))}) for i in range(160)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    images = rng.standard_normal((200, 128)).astype(np.float32) + 0.2
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    np.save(tmp_path / "img.npy", images)
    cfg = GenerateConfig(corpus=[str(tmp_path / "corpus.jsonl")], out=str(tmp_path / "gen"), id_field="id",
                         model="toy", pretrained="random", aligner="centroid", images=str(tmp_path / "img.npy"),
                         fit_samples=100, samples_per_shard=50, batch_size=32, workers=0, threads=1, progress=False,
                         keep_source=True, cache_dir=str(tmp_path / "hf-cache"))
    generate(cfg)
    out = tmp_path / "r"
    argv = ["--shards", str(tmp_path / "gen"), "--images", str(tmp_path / "img.npy"), "--out", str(out), "--k", "5",
            "--source-baseline", *FAST]
    assert audit_cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    folder = report["folders"][0]
    assert folder["n_sampled"] == 160 and folder["has_src"] and folder["aligner"]["name"] == "centroid"
    assert report["model_fingerprint"].startswith("toy|random|sha256=")
    raw_text = report["folders"][1]
    assert raw_text["reference"] and raw_text["label"] == "source text (gen)"
    assert folder["metrics"]["delta_mu"] < raw_text["metrics"]["delta_mu"] / 2  # the aligner moved texts to images
    assert any("cannot be verified" in w for w in report["warnings"])  # the bare .npy has no sidecar
    (tmp_path / "img.json").write_text(json.dumps({"model": OTHER_FP}))
    assert audit_cli.main(argv) == 2
    assert "different CLIP models" in capsys.readouterr().err


def test_max_queries_samples_the_knn_queries(world, tmp_path):
    out = tmp_path / "r"
    argv = ["--shards", str(world["folders"]["centroid"]), "--images", str(world["images_path"]), "--out", str(out),
            "--k", "10", "--max-queries", "100", *FAST]
    assert audit_cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    knn = report["folders"][0]["knn"]
    assert knn["mixing"]["n_queries"] == 200 and knn["mixing"]["n_base"] == 2 * len(world["corpus"])
    assert knn["source"]["n_queries"] == knn["substitute"]["n_queries"] == 100
    assert report["settings"]["max_queries"] == 100
    assert 0 < report["folders"][0]["metrics"]["M_k_Z"] < 1.5


def test_zero_vector_sample_is_named(world, tmp_path, capsys):
    rows = world["substitutes"]["centroid"][:300].copy()
    folder = write_shard_folder(tmp_path / "zero", rows, override={42: np.zeros(rows.shape[1], dtype=np.float16)},
                                model=world["aligners"]["centroid"].model_fingerprint)
    argv = ["--shards", str(folder), "--images", str(world["images_path"]), "--out", str(tmp_path / "r"), *FAST]
    assert audit_cli.main(argv) == 2
    assert "zero/shard-000000.tar sample s000000-000042: emb.npy is all zeros and has no direction" in \
        capsys.readouterr().err


def test_nan_sample_and_dimension_mismatch_exit_2_naming_the_input(world, tmp_path, capsys):
    rows = world["substitutes"]["centroid"][:300].astype(np.float16)
    bad = rows[150].copy()
    bad[3] = np.inf
    fp = world["aligners"]["centroid"].model_fingerprint
    nan_folder = write_shard_folder(tmp_path / "naninf", rows, override={150: bad}, model=fp)
    out = tmp_path / "r"
    base = ["--images", str(world["images_path"]), "--out", str(out), "--k", "5", *FAST]
    assert audit_cli.main(["--shards", str(nan_folder), *base]) == 2
    assert "naninf/shard-000001.tar sample s000001-000050: emb.npy contains NaN or Inf" in capsys.readouterr().err
    assert not (out / "report.json").exists()
    assert audit_cli.main(["--shards", str(nan_folder), *base, "--skip-corrupt"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and report["folders"][0]["n_sampled"] == 299
    assert report["folders"][0]["skipped_samples"] == 1 and report["folders"][0]["skipped_shards"] == []
    wide = write_shard_folder(tmp_path / "wide", np.hstack([rows, rows[:, :4]]), model=fp)
    assert audit_cli.main(["--shards", str(wide), *base]) == 2
    err = capsys.readouterr().err
    assert "dimension mismatch between inputs" in err and "wide" in err and "d=28" in err and "d=24" in err


def test_same_seed_gives_the_same_report_and_plot_bytes(world, tmp_path):
    reports = []
    for name in ("a", "b"):
        argv = ["--shards", str(world["folders"]["realign"]), "--images", str(world["images_path"]), "--out",
                str(tmp_path / name), "--k", "5", "--max-samples", "500", "--max-queries", "200", *FAST]
        assert audit_cli.main(argv) == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        for volatile in ("timings", "command", "settings"):
            report.pop(volatile)
        for graph in report["folders"][0]["knn"].values():  # wall-clock seconds of each kNN search
            graph.pop("seconds")
        reports.append(report)
    assert reports[0]["folders"][0]["n_sampled"] == 500
    assert reports[0] == reports[1]
    for png in sorted((tmp_path / "a" / "plots").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / "plots" / png.name).read_bytes(), png.name
