"""Running the whole experiment: data -> LM text pretraining -> aligners -> stage 1 -> stage 2 -> report.

Writes ``<out>/results.json`` (every number, the config, timings) and, when asked, the Markdown report.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .report import render_report
from .stage1 import fit_aligners, run_stage1
from .stage2 import run_stage2
from .textlm import pretrain_tiny_lm
from .world import build_world


def _machine() -> str:
    import torch

    return (f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), no GPU used" if not torch.cuda.is_available()
            else f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def run_experiment(cfg: ExperimentConfig, *, doc_path: str | None = None, command: str = "", stage2: bool = True,
                   log=print) -> dict:
    """Run everything in ``cfg``; returns the results dict (also written to ``<out>/results.json``)."""
    import torch

    torch.set_num_threads(max(1, int(cfg.threads)))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t_all = t0 = time.perf_counter()
    world = build_world(cfg, log=log)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lm_info = None
    if cfg.lm == "tiny":
        lm_dir = out / "lm"
        lm_info = pretrain_tiny_lm(lm_dir, world.captions, world.text_emb, world.instruction_records,
                                   world.instruction_text_emb,
                                   hidden=cfg.lm_hidden, layers=cfg.lm_layers, heads=cfg.lm_heads,
                                   steps=cfg.lm_pretrain_steps, batch_size=cfg.lm_pretrain_batch,
                                   lr=cfg.lm_pretrain_lr, seed=cfg.seed, log=log)
        lm = str(lm_dir)
    elif cfg.lm == "smollm2":
        from ..train.lm import smollm2_gguf_path

        smollm2_gguf_path()  # clear error with the install command when missing
        lm = "smollm2"
    else:
        raise ValueError(f"lm must be 'tiny' or 'smollm2', got {cfg.lm!r}")
    timings["lm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    aligners = fit_aligners(cfg, world, log=log)
    timings["aligners"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    s1 = run_stage1(cfg, world, lm, aligners, log=log)
    timings["stage1"] = time.perf_counter() - t0

    s2 = None
    if stage2:
        t0 = time.perf_counter()
        s2 = run_stage2(cfg, world, lm, s1, aligners, log=log)
        timings["stage2"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    timings["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    res = _jsonable({"config": cfg.to_dict(), "command": command or "python pipelines/experiment.py",
                     "machine": _machine(), "timings": timings, "lm_pretraining": lm_info,
                     "data": {"n_conversations": len(world.instruction_records), "n_qa": len(world.qa_records)},
                     "stage1": s1, "stage2": s2})
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if doc_path:
        write_report(res, doc_path)
        log(f"wrote {doc_path}")
    return res


def write_report(res: dict, doc_path: str) -> None:
    path = Path(doc_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_report(res), encoding="utf-8")
    tmp.replace(path)
