"""`make demo`: the whole product on the embedded default (the toy world and its CLIP), on this machine.

Each step runs the same command a user would type (printed before it runs) and says where its output
went:

1. build the toy-world corpora: text-only captions, unpaired images, held-out paired data;
2. embed the unpaired images, and the held-out images and captions (the paired evaluation set);
3. ``accelerate launch`` the generator with 2 processes: AnisoAlign is fitted on the fly on the
   unpaired images, then every caption becomes a substitute image embedding in ``shards/toyworld``;
4. audit the shards' geometry against the images (``report.html``);
5. train stage 1 of the LLaVA-style trainer with the tiny LM on the shards (text only: no image is
   ever paired with a caption);
6. evaluate on the *real* held-out image embeddings: generated captions next to the scenes' true
   descriptions, and attribute accuracy.

Every step resumes or reuses finished outputs, so a rerun is quick; ``--fresh`` starts over.
``--small`` is the reduced form the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from anisogen.cli import console_script

#: The repository checkout (``pip install -e .``): the demo runs its ``pipelines/*.py`` scripts and writes under it.
ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines"


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo run (counts of records; steps of training)."""

    n_text: int
    n_images: int
    n_heldout: int
    samples_per_shard: int
    fit_samples: int
    stage1_steps: int
    refine_steps: int
    train_steps: int
    eval_pairs: int


FULL = DemoScale(n_text=20_000, n_images=2_000, n_heldout=500, samples_per_shard=2_500, fit_samples=10_000,
                 stage1_steps=600, refine_steps=200, train_steps=1_500, eval_pairs=200)
SMALL = DemoScale(n_text=1_200, n_images=400, n_heldout=60, samples_per_shard=300, fit_samples=1_200,
                  stage1_steps=60, refine_steps=20, train_steps=30, eval_pairs=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "toyworld", help="toy-world corpora and embeddings")
    p.add_argument("--shards", type=Path, default=ROOT / "shards" / "toyworld", help="generated shard folder")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo", help="audit report, training run, evaluation")
    p.add_argument("--small", action="store_true", help="reduced sizes (the tests' form; about a minute)")
    p.add_argument("--fresh", action="store_true", help="delete the three folders above first")
    p.add_argument("--processes", type=int, default=2, help="accelerate processes for the generator")
    return p.parse_args(argv)


class Runner:
    """Runs pipeline commands with this interpreter, printing each one and timing it."""

    def __init__(self):
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        # one BLAS/OpenMP thread per process: the tiny models gain nothing from more, and
                        # oversubscribed OpenMP threads on a busy machine make steps ten times slower
                        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.timings: list[tuple[str, float]] = []

    def __call__(self, title: str, args: list[str], env: dict[str, str] | None = None) -> None:
        shown = " ".join(shlex.quote(str(a)) for a in args)
        print(f"\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([str(a) for a in args], cwd=ROOT, env={**self.env, **(env or {})}, check=True)
        self.timings.append((title, time.perf_counter() - t0))

    def script(self, name: str, *args) -> list[str]:
        return [sys.executable, str(PIPELINES / name), *map(str, args)]

    def launch(self, processes: int, name: str, *args) -> tuple[list[str], dict[str, str]]:
        """``accelerate launch`` of a pipeline script, and the environment it needs: CPU processes (gloo,
        GPUs hidden from this command only) when there are fewer GPUs than processes."""
        import torch

        flags = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
        env = {}
        if processes > 1:
            flags = ["--multi_gpu", "--num_processes", str(processes), *flags]
            if torch.cuda.device_count() < processes:
                env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            flags = ["--num_processes", "1", *flags]
        return [sys.executable, "-m", "accelerate.commands.launch", *flags, str(PIPELINES / name), *map(str, args)], env


def step(n: int, title: str) -> None:
    print(f"\n== step {n}/6: {title} ==", flush=True)


def build_paired_set(data: Path) -> Path:
    """Join the held-out image and caption embeddings into ``heldout_paired/{image,text}.npy``.

    Rows are matched by scene id (image file stem == pair id), so the pairing never depends on file order.
    """
    import numpy as np

    from anisogen.embedding_files import open_embeddings

    img_dir, txt_dir, out = (
        data / "emb" / "heldout_images",
        data / "emb" / "heldout_texts",
        data / "emb" / "heldout_paired",
    )
    image = open_embeddings(img_dir / "img_emb.npy").load(dtype=np.float32)
    text = open_embeddings(txt_dir / "text_emb.npy").load(dtype=np.float32)
    img_ids = [Path(k).stem for k in (img_dir / "img_keys.txt").read_text(encoding="utf-8").splitlines()]
    txt_ids = (txt_dir / "text_ids.txt").read_text(encoding="utf-8").splitlines()
    row_of_image = {k: i for i, k in enumerate(img_ids)}
    missing = [k for k in txt_ids if k not in row_of_image]
    if missing:
        raise SystemExit(f"held-out captions without an image embedding: {missing[:5]} ({len(missing)} in all)")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", image[[row_of_image[k] for k in txt_ids]].astype(np.float32))
    np.save(out / "text.npy", text.astype(np.float32))
    shutil.copyfile(img_dir / "img_emb.json", out / "image.json")
    return out


def write_references(data: Path) -> Path:
    """``heldout_descriptions.jsonl``: the full *descriptive* caption of each held-out scene (every
    attribute named), the reference the evaluation scores generated captions against."""
    from anisogen.toyworld.text import STYLES

    col = STYLES.index("descriptive")
    out = data / "heldout_descriptions.jsonl"
    with open(data / "heldout" / "pairs.jsonl", encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            pair = json.loads(line)
            dst.write(json.dumps({"id": pair["id"], "text": pair["captions"][col]}) + "\n")
    return out


def scene_scores(data: Path, eval_dir: Path) -> dict:
    """Attribute accuracy of the generated captions against the held-out *scenes* themselves (the
    experiment's metric, :func:`anisogen.experiment.scoring.caption_scores`: the caption accuracy over
    the attribute kinds each caption names, and the per-kind completeness), written to ``scene_scores.json``."""
    from anisogen.experiment.scoring import caption_scores
    from anisogen.toyworld.scenes import Scene

    with open(eval_dir / "captions.jsonl", encoding="utf-8") as f:
        generated = [json.loads(line)["generated"] for line in f]
    with open(data / "heldout" / "pairs.jsonl", encoding="utf-8") as f:
        scenes = [Scene.from_dict(json.loads(line)["scene"]) for _, line in zip(generated, f)]
    scores = {k: v for k, v in caption_scores(generated, scenes).items() if k != "per_sample"}
    (eval_dir / "scene_scores.json").write_text(json.dumps(scores, indent=1))
    return scores


def show_evaluation(data: Path, eval_dir: Path, n_show: int = 5) -> None:
    report = json.loads((eval_dir / "report.json").read_text())
    print(f"\nheld-out real image embeddings: {report.get('n')} scenes, caption loss {report.get('caption_loss'):.3f}")
    attrs = report.get("attributes") or {}
    for name, score in attrs.items():
        if isinstance(score, dict) and score.get("exact") is not None:
            print(f"  {name:9s} exact {score['exact']:.3f}  recall {score['recall']:.3f}  "
                  f"precision {(score['precision'] or 0):.3f}  (n={score['n']})")
    if attrs.get("all_exact") is not None:
        print(f"  every attribute exact: {attrs['all_exact']:.3f}")
    scores = scene_scores(data, eval_dir)
    print(f"caption accuracy against the scenes (every attribute a caption names is checked): {scores['accuracy']:.3f}")
    print("completeness per kind (0 when a caption does not name it):")
    print("  " + "  ".join(f"{k} {scores[k]:.3f}" for k in ("color", "shape", "size", "position", "count", "mean")))
    print(f"  precision of the attribute words named: {scores['precision']:.3f}")
    with open(eval_dir / "captions.jsonl", encoding="utf-8") as f:
        samples = [json.loads(line) for _, line in zip(range(n_show), f)]
    print("\ngenerated from the real image embedding  |  the scene's true description")
    for s in samples:
        print(f"  {s['generated']!r}\n      | {s['reference']!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = SMALL if args.small else FULL
    data, shards, runs = args.data.resolve(), args.shards.resolve(), args.runs.resolve()
    if args.fresh:
        for folder in (data, shards, runs):
            shutil.rmtree(folder, ignore_errors=True)
    run = Runner()
    t_start = time.perf_counter()

    step(1, "toy-world corpora (captions, unpaired images, held-out pairs)")
    if (data / "manifest.json").exists():
        print(f"reusing {data} (delete it or pass --fresh to rebuild)")
    else:
        run("corpora", run.script("make_toy_corpora.py", "--out", data, "--n-text", scale.n_text,
                                  "--n-images", scale.n_images, "--n-heldout", scale.n_heldout))
    print(f"-> {data}/captions.jsonl, {data}/images/, {data}/heldout/")

    step(2, "embed the unpaired images and the held-out pairs with the toy CLIP")
    emb = data / "emb"
    for name, src in (("images", data / "images"), ("heldout_images", data / "heldout" / "images")):
        if not (emb / name / "img_emb.npy").exists():
            run(f"embed {name}", run.script("embed_images.py", "--images", src, "--model", "toy", "--out", emb / name,
                                            "--workers", "0", "--threads", "1", "--no-progress"))
    if not (emb / "heldout_texts" / "text_emb.npy").exists():
        run("embed held-out captions", run.script(
            "embed_texts.py", "--corpus", data / "heldout" / "pairs.jsonl", "--text-field", "caption",
            "--id-field", "id", "--model", "toy", "--out", emb / "heldout_texts", "--no-progress"))
    paired = build_paired_set(data)
    references = write_references(data)
    print(f"-> unpaired images {emb / 'images'}, paired held-out set {paired}")

    step(3, f"generate substitute image embeddings: accelerate launch, {args.processes} processes, AnisoAlign")
    launch_args, launch_env = run.launch(
        args.processes, "generate.py", "--corpus", data / "captions.jsonl", "--text-field", "text", "--id-field", "id",
        "--model", "toy", "--aligner", "anisoalign", "--images", emb / "images",
        "--param", f"stage1_steps={scale.stage1_steps}", "--param", f"stage2_steps={scale.refine_steps}",
        "--fit-samples", scale.fit_samples, "--samples-per-shard", scale.samples_per_shard, "--keep-source",
        "--out", shards, "--threads", "1", "--no-progress")
    run("generate", launch_args, env=launch_env)
    print(f"-> {shards}/shard-*.tar, manifest.json, aligner/")

    step(4, "audit the shards' geometry with FAISS")
    audit_dir = runs / "audit"
    run("audit", run.script("audit.py", "--shards", shards, "--labels", "anisoalign", "--images", emb / "images",
                            "--paired", paired, "--source-baseline", "--out", audit_dir, "--no-progress"))
    print(f"-> {audit_dir}/report.html (open it in a browser), {audit_dir}/report.json")

    step(5, "stage 1: train the projector and the tiny LM on the shards (text only)")
    train_dir = runs / "stage1"
    run("train", run.script("train.py", "--train-shards", shards, "--lm", "tiny", "--method", "full",
                            "--template", "plain", "--projector", "mlp2x_gelu", "--batch-size", 32,
                            "--max-steps", scale.train_steps, "--lr", "2e-3", "--adapter-lr", "2e-3",
                            "--out", train_dir, "--log-every", max(1, scale.train_steps // 6),
                            "--save-every", scale.train_steps, "--no-progress"))
    print(f"-> {train_dir}/export (load it with anisogen.train.load_export)")

    step(6, "evaluate on real held-out image embeddings")
    eval_dir = runs / "eval"
    run("evaluate", run.script("evaluate.py", "--export", train_dir / "export", "--images", paired / "image.npy",
                               "--captions", references, "--caption-field", "text", "--limit", scale.eval_pairs,
                               "--attributes", "toyworld", "--max-new-tokens", 140, "--out", eval_dir))
    show_evaluation(data, eval_dir)
    print(f"-> {eval_dir}/report.json, {eval_dir}/captions.jsonl")

    total = time.perf_counter() - t_start
    print("\n== demo finished in {:.0f} s ==".format(total))
    for title, seconds in run.timings:
        print(f"  {title:24s} {seconds:7.1f} s")
    return 0


entry = console_script(main)
