"""Stage 2, instruction tuning on conversations whose embeddings are substitutes (text-only), starting
from the stage-1 export of ``cfg.stage2_aligner``:

* ``projector``: projector-only tuning (LM frozen); then APP (``cfg.app_spec``) vs the naive task
  vector (``naive``: theta_pre + 1.0 * tau, i.e. the fine-tuned projector itself) -- both are
  post-processors of the same run; the stage-1 export without any stage 2 is evaluated as the anchor;
* ``lora-r1`` (PEFT init: A random, B = 0) vs ``gap_init`` (r = 1, B = the text-visual gap direction)
  over ``cfg.stage2_seeds``, same targets (attention + MLP), alpha = 2, projector frozen;
* ``mores`` (rank 1, projector frozen) vs ``lora-r8`` (attention, projector frozen), with the
  trainable parameter counts read from the exports.

Every export is evaluated on held-out questions with real image embeddings (QA accuracy by type, POPE
on the existence questions)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .runs import evaluate_qa, train_run, trainable_parameters, write_instruction_data
from .world import World

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mean_std(xs) -> dict:
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def run_stage2(cfg: ExperimentConfig, world: World, lm: str, stage1: dict, aligners: dict, log=print) -> dict:
    root = Path(cfg.out_dir) / "stage2"
    name = cfg.stage2_aligner
    if "mllm" not in stage1.get(name, {}):
        raise ValueError(f"stage2_aligner={name!r} has no stage-1 captioner run (mllm_conditions: "
                         f"{list(cfg.mllm_conditions)})")
    al = aligners[name]["aligner"]
    init = stage1[name]["mllm"]["runs"][0]["export_dir"]  # the first stage-1 seed
    sub = al.transform(world.instruction_text_emb).astype(np.float32)
    jsonl, npy = write_instruction_data(root / "data", world.instruction_records, sub)
    eval_emb = al.transform_image(world.eval_emb).astype(np.float32)

    def qa(export):
        t0 = time.perf_counter()
        r = evaluate_qa(export, eval_emb, world.qa_records, max_new_tokens=cfg.answer_tokens,
                        batch_size=cfg.eval_batch)
        r["eval_seconds"] = time.perf_counter() - t0
        return r

    def run(tag, seed, **kw):
        s = train_run(root / tag, lm=lm, train_jsonl=jsonl, emb_npy=npy, template="hf_chat", steps=cfg.stage2_steps,
                      batch_size=cfg.stage2_batch, lr=cfg.stage2_lr, adapter_lr=cfg.adapter_lr, seed=seed,
                      init_from=init, **kw)
        losses = s.get("losses") or [float("nan")]
        return s, {"train_seconds": s["seconds"], "final_train_loss": float(np.mean(losses[-10:]))}

    out: dict = {"aligner": name, "n_conversations": len(world.instruction_records), "n_qa": len(world.qa_records)}

    # projector-only, APP vs naive task vector
    from ..train.methods.app import export_slug

    s, info = run("projector", cfg.seed, post=[f"app:{cfg.app_spec}", "app:naive"])
    base = Path(s["export_dir"]).parent
    out["merge"] = {
        "stage1 (theta_pre)": {**qa(init), "train_seconds": 0.0},
        "naive task vector": {**qa(base / f"export_app-{export_slug('naive')}"), **info},
        f"APP {cfg.app_spec}": {**qa(base / f"export_app-{export_slug(cfg.app_spec)}"), **info},
    }
    for k, v in out["merge"].items():
        log(f"stage 2 {k}: QA {v['qa_accuracy']:.3f}, POPE acc {v['pope']['accuracy']:.3f} F1 {v['pope']['f1']:.3f}")

    # rank-1 LoRA: random (PEFT) init vs Gap-Init, over seeds
    lora1 = {"r": 1, "alpha": 2, "dropout": 0.05, "targets": ALL_TARGETS}
    gap = {"r": 1, "alpha": 2, "dropout": 0.05, "targets": ",".join(ALL_TARGETS)}
    seeds: dict = {"lora-r1 (random init)": [], "gap_init r1": []}
    for seed in cfg.stage2_seeds:
        for tag, method, opts in (("lora-r1 (random init)", "lora", lora1), ("gap_init r1", "gap_init", gap)):
            s, info = run(f"{method}-r1-seed{seed}", seed, method=method, method_options=opts, freeze_projector=True)
            r = {
                **qa(s["export_dir"]),
                **info,
                "seed": seed,
                "trainable_parameters": trainable_parameters(s["export_dir"]),
            }
            seeds[tag].append(r)
            log(f"stage 2 {tag} seed {seed}: QA {r['qa_accuracy']:.3f}, POPE acc {r['pope']['accuracy']:.3f}")
    out["seeds"] = {tag: {"qa_accuracy": _mean_std([r["qa_accuracy"] for r in rs]),
                          "pope_accuracy": _mean_std([r["pope"]["accuracy"] for r in rs]),
                          "pope_f1": _mean_std([r["pope"]["f1"] for r in rs]),
                          "trainable_parameters": rs[0]["trainable_parameters"],
                          "train_seconds": float(np.sum([r["train_seconds"] for r in rs])), "runs": rs}
                    for tag, rs in seeds.items()}

    # MoReS rank 1 vs LoRA rank 8
    out["peft"] = {}
    for tag, method, opts in (("MoReS r1", "mores", {"rank": 1, "seed": cfg.seed}),
                              ("LoRA r8", "lora", {"r": 8, "alpha": 16})):
        s, info = run(
            tag.replace(" ", "-").lower(), cfg.seed, method=method, method_options=opts, freeze_projector=True
        )
        r = {**qa(s["export_dir"]), **info, "trainable_parameters": trainable_parameters(s["export_dir"])}
        out["peft"][tag] = r
        log(f"stage 2 {tag}: QA {r['qa_accuracy']:.3f}, params {r['trainable_parameters']}")
    return out
