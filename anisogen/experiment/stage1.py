"""Stage 1, the substitution study, for every aligner plus Oracle (real image embeddings of the same
scenes) and Blind (one constant embedding for every sample, at training and at evaluation):

* the **transfer probe** (seconds): attribute classifiers trained on the condition's embeddings of the
  train captions, scored on real held-out and novel-split images, plus retrieval;
* for the conditions of ``cfg.mllm_conditions``, **captioner runs**: projector-only pretraining on the
  substitutes, once per seed of ``cfg.stage1_seeds``, each captioning real held-out and novel-split
  images.

Real images always pass through the aligner's image-side transform (the identity except for
Unicorn's image centring)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .probe import probe_condition, scene_labels
from .scoring import caption_scores
from .runs import evaluate_captions, train_run, write_caption_data
from .world import World

ORACLE, BLIND = "oracle", "blind"


def fit_aligners(cfg: ExperimentConfig, world: World, log=print) -> dict:
    """Fit each aligner of ``cfg.aligners`` on the unpaired caption texts / images; save the artifacts.

    Returns ``{name: {"aligner", "fit_seconds"}}``."""
    from ..align import fit_aligner, load_aligner

    root = Path(cfg.out_dir) / "aligners"
    out = {}
    for name in cfg.aligners:
        folder = root / name
        params = cfg.aligner_params.get(name, {})
        stamp = folder / "experiment_params.json"
        want = {"params": params, "seed": cfg.seed, "n_text": len(world.text_emb),
                "n_image": len(world.unpaired_image_emb), "clip": world.clip_fingerprint}
        if stamp.is_file() and json.loads(stamp.read_text()) == want:
            al = load_aligner(folder)
            out[name] = {"aligner": al, "fit_seconds": json.loads((folder / "fit_seconds.json").read_text())}
            log(f"aligner {name}: reusing {folder}")
            continue
        t0 = time.perf_counter()
        al = fit_aligner(name, text=world.text_emb, image=world.unpaired_image_emb, seed=cfg.seed,
                         model_fingerprint=world.clip_fingerprint, normalize=True, **params)
        secs = time.perf_counter() - t0
        al.save(folder)
        (folder / "fit_seconds.json").write_text(json.dumps(secs))
        stamp.write_text(json.dumps(want))
        log(f"aligner {name}: fitted in {secs:.1f}s")
        out[name] = {"aligner": al, "fit_seconds": secs}
    return out


def _cosine_to_oracle(sub: np.ndarray, oracle: np.ndarray) -> float:
    """Mean cosine between each substitute and the real image embedding of the same scene (a diagnostic
    only: the Oracle pairing is never used to fit or train anything)."""
    a = sub / np.linalg.norm(sub, axis=1, keepdims=True)
    b = oracle / np.linalg.norm(oracle, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def _probe(c: "Condition", labels: dict, seed: int) -> dict:
    """The transfer probe of one condition (``probe.py``): attribute probes trained on its training
    embeddings, scored on the real held-out and novel-split images; retrieval of the held-out images
    by the substitutes of their captions (not for Oracle, which has no text side)."""
    evals = {"heldout": (c.eval_emb, labels["heldout"]), "novel": (c.novel_emb, labels["novel"])}
    return probe_condition(c.train_emb, labels["train"], evals, queries=c.queries,
                           gallery=c.eval_emb if c.queries is not None else None, seed=seed)


@dataclass
class Condition:
    """One stage-1 condition: what its projector trains on and what it is evaluated on (real images,
    through the aligner's image-side transform)."""

    name: str
    train_emb: np.ndarray  # (n_text, d) one embedding per train caption
    eval_emb: np.ndarray  # (n_eval, d) held-out images
    novel_emb: np.ndarray  # (n_novel, d) novel-split images
    queries: np.ndarray | None  # (n_eval, d) substitutes of the held-out captions (retrieval), or None
    fit_seconds: float


def conditions(cfg: ExperimentConfig, world: World, aligners: dict) -> list[Condition]:
    """The aligners of ``cfg.aligners``, then Oracle (real image embeddings of the caption scenes) and
    Blind (one constant embedding everywhere: no image information at all)."""
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out = []
    for name in cfg.aligners:
        al = aligners[name]["aligner"]
        out.append(Condition(name, f32(al.transform(world.text_emb)), f32(al.transform_image(world.eval_emb)),
                             f32(al.transform_image(world.novel_emb)), f32(al.transform(world.eval_text_emb)),
                             aligners[name]["fit_seconds"]))
    out.append(Condition(ORACLE, world.oracle_emb, world.eval_emb, world.novel_emb, None, 0.0))
    b = world.blind_vector()
    tile = lambda n: np.tile(b, (n, 1))  # noqa: E731
    out.append(Condition(BLIND, tile(len(world.text_emb)), tile(len(world.eval_emb)), tile(len(world.novel_emb)),
                         tile(len(world.eval_emb)), 0.0))
    return out


def reference_accuracy(world: World) -> dict:
    """Caption accuracy of the reference captions themselves (a perfect captioner) per split."""
    out = {"heldout": caption_scores(world.eval_captions, world.eval_scenes)["accuracy"]}
    if len(world.novel_scenes):
        out["novel"] = caption_scores(world.novel_captions, world.novel_scenes)["accuracy"]
    return out


def _caption_eval(export: str, emb: np.ndarray, scenes, references, cfg: ExperimentConfig) -> dict:
    ev = evaluate_captions(export, emb, scenes, references, max_new_tokens=cfg.caption_tokens,
                           batch_size=cfg.eval_batch)
    return {"attributes": ev["attributes"], "caption_loss": ev["caption_loss"],
            "per_scene": [smp["accuracy"] for smp in ev["samples"]], "samples": ev["samples"][:12]}


def _aggregate(evals: list[dict]) -> dict:
    """Mean over seeds of one split's scores; ``per_scene`` keeps every seed (seeds x scenes) for the
    bootstrap; ``seed_accuracy`` lists each seed's mean."""
    keys = evals[0]["attributes"].keys()
    return {"accuracy": float(np.mean([e["attributes"]["accuracy"] for e in evals])),
            "seed_accuracy": [e["attributes"]["accuracy"] for e in evals],
            "attributes": {k: float(np.mean([e["attributes"][k] for e in evals])) for k in keys},
            "caption_loss": float(np.mean([e["caption_loss"] for e in evals])),
            "per_scene": [e["per_scene"] for e in evals], "samples": evals[0]["samples"]}


def captioner_runs(cfg: ExperimentConfig, world: World, lm: str, c: Condition, log=print) -> dict:
    """Projector-only stage-1 training of condition ``c``, once per seed of ``cfg.stage1_seeds``, each
    run captioning the held-out and the novel-split images."""
    root = Path(cfg.out_dir) / "stage1" / c.name
    jsonl, npy = write_caption_data(root / "data", world.captions, c.train_emb)
    runs, splits = [], {"heldout": [], "novel": []}
    for seed in cfg.stage1_seeds:
        summary = train_run(root / f"seed{seed}", lm=lm, train_jsonl=jsonl, emb_npy=npy, template="plain",
                            steps=cfg.stage1_steps, batch_size=cfg.stage1_batch, lr=cfg.stage1_lr, seed=seed)
        t0 = time.perf_counter()
        splits["heldout"].append(_caption_eval(summary["export_dir"], c.eval_emb, world.eval_scenes,
                                               world.eval_captions, cfg))
        if len(world.novel_scenes):
            splits["novel"].append(_caption_eval(summary["export_dir"], c.novel_emb, world.novel_scenes,
                                                 world.novel_captions, cfg))
        losses = summary.get("losses") or [float("nan")]
        runs.append({"seed": seed, "export_dir": summary["export_dir"], "train_seconds": summary["seconds"],
                     "eval_seconds": time.perf_counter() - t0, "final_train_loss": float(np.mean(losses[-10:])),
                     "reused": bool(summary.get("reused"))})
        log(f"stage 1 {c.name} seed {seed}: caption accuracy {splits['heldout'][-1]['attributes']['accuracy']:.3f}, "
            f"train {summary['seconds']:.0f}s, eval {runs[-1]['eval_seconds']:.0f}s")
    return {"runs": runs, **{k: _aggregate(v) for k, v in splits.items() if v}}


def run_stage1(cfg: ExperimentConfig, world: World, lm: str, aligners: dict, log=print) -> dict:
    """The transfer probe for every condition and the captioner runs for ``cfg.mllm_conditions``;
    returns ``{condition: result}`` (order: aligners, Oracle, Blind)."""
    labels = {"train": scene_labels(world.text_scenes), "heldout": scene_labels(world.eval_scenes),
              "novel": scene_labels(world.novel_scenes)}
    results = {}
    for c in conditions(cfg, world, aligners):
        t0 = time.perf_counter()
        r = {"fit_seconds": c.fit_seconds,
             "substitute_cosine_to_image": _cosine_to_oracle(c.train_emb, world.oracle_emb),
             "probe": _probe(c, labels, cfg.seed)}
        r["probe_seconds"] = time.perf_counter() - t0
        log(f"stage 1 {c.name}: probe (linear, held-out) {r['probe']['linear']['heldout']['mean']:.3f} "
            f"in {r['probe_seconds']:.0f}s")
        if c.name in cfg.mllm_conditions:
            r["mllm"] = captioner_runs(cfg, world, lm, c, log=log)
        results[c.name] = r
    return results
