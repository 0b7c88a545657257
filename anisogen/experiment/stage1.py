"""Stage 1, the substitution study: projector-only pretraining on substitute embeddings of train
captions, one run per aligner, plus Oracle (real image embeddings of the same scenes) and Blind (one
constant embedding for every sample, at training and at evaluation: no image information at all).

Every run is evaluated on real held-out image embeddings (passed through the aligner's image-side
transform, which is the identity except for Unicorn's image centring)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .probe import probe_condition, scene_labels
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


def _probe(train_emb, eval_emb, sides, labels, seed: int) -> dict:
    """The transfer probe of one condition (``probe.py``): attribute probes trained on its training
    embeddings, scored on the real held-out and novel-split images; retrieval of the held-out images
    by the substitutes of their captions (not for Oracle, which has no text side)."""
    novel_emb, queries = sides
    evals = {"heldout": (eval_emb, labels["heldout"]), "novel": (novel_emb, labels["novel"])}
    return probe_condition(train_emb, labels["train"], evals, queries=queries,
                           gallery=eval_emb if queries is not None else None, seed=seed)


def run_stage1(cfg: ExperimentConfig, world: World, lm: str, aligners: dict, log=print) -> dict:
    """Train and evaluate every stage-1 condition; returns ``{condition: result}`` (order: aligners,
    Oracle, Blind)."""
    root = Path(cfg.out_dir) / "stage1"
    conditions, probe_sides = [], {}
    for name in cfg.aligners:
        al = aligners[name]["aligner"]
        conditions.append((name, al.transform(world.text_emb).astype(np.float32),
                           al.transform_image(world.eval_emb).astype(np.float32), aligners[name]["fit_seconds"]))
        probe_sides[name] = (al.transform_image(world.novel_emb), al.transform(world.eval_text_emb))
    conditions.append((ORACLE, world.oracle_emb, world.eval_emb, 0.0))
    probe_sides[ORACLE] = (world.novel_emb, None)
    blind = world.blind_vector()
    conditions.append((BLIND, np.tile(blind, (len(world.text_emb), 1)), np.tile(blind, (len(world.eval_emb), 1)), 0.0))
    probe_sides[BLIND] = (np.tile(blind, (len(world.novel_emb), 1)), np.tile(blind, (len(world.eval_emb), 1)))
    labels = {"train": scene_labels(world.text_scenes), "heldout": scene_labels(world.eval_scenes),
              "novel": scene_labels(world.novel_scenes)}
    results = {}
    for name, train_emb, eval_emb, fit_s in conditions:
        out = root / name
        jsonl, npy = write_caption_data(out / "data", world.captions, train_emb)
        summary = train_run(out, lm=lm, train_jsonl=jsonl, emb_npy=npy, template="plain", steps=cfg.stage1_steps,
                            batch_size=cfg.stage1_batch, lr=cfg.stage1_lr, seed=cfg.seed)
        t0 = time.perf_counter()
        ev = evaluate_captions(summary["export_dir"], eval_emb, world.eval_scenes, world.eval_captions,
                               max_new_tokens=cfg.caption_tokens, batch_size=cfg.eval_batch)
        ev_s = time.perf_counter() - t0
        losses = summary.get("losses") or [float("nan")]
        results[name] = {
            **ev, "export_dir": summary["export_dir"], "train_seconds": summary["seconds"], "eval_seconds": ev_s,
            "fit_seconds": fit_s, "final_train_loss": float(np.mean(losses[-10:])),
            "substitute_cosine_to_image": _cosine_to_oracle(train_emb, world.oracle_emb),
            "probe": _probe(train_emb, eval_emb, probe_sides[name], labels, cfg.seed),
        }
        a = ev["attributes"]
        log(f"stage 1 {name}: attr mean {a['mean']:.3f} (colour {a['color']:.3f}, shape {a['shape']:.3f}), "
            f"caption loss {ev['caption_loss']:.3f}, train {summary['seconds']:.0f}s, eval {ev_s:.0f}s")
    return results
