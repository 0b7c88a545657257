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
from .goals import evaluate_goals
from .report import README_BEGIN, README_END, render_headline, render_report
from .stage1 import fit_aligners, reference_accuracy, run_stage1
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


def run_experiment(cfg: ExperimentConfig, *, doc_path: str | None = None, readme_path: str | None = None,
                   command: str = "", stage2: bool = True, log=print) -> dict:
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
                                   lr=cfg.lm_pretrain_lr, seed=cfg.seed, vocab_size=cfg.lm_vocab, log=log)
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
                     "reference_captions": reference_accuracy(world),
                     "stage1": s1, "stage2": s2})
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if doc_path:
        write_report(res, doc_path, readme_path)
        log(f"wrote {doc_path}" + (f" and the results block of {readme_path}" if readme_path else ""))
    return res


def write_report(res: dict, doc_path: str, readme_path: str | None = None) -> None:
    """Write the report to ``doc_path``; with ``readme_path``, also replace the generated headline block
    of that README (between :data:`README_BEGIN` and :data:`README_END`)."""
    goals = evaluate_goals(res)  # bootstraps: once for both documents
    _atomic_write(Path(doc_path), render_report(res, goals))
    if readme_path:
        path = Path(readme_path)
        text = check_readme(path)
        head, rest = text.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        _atomic_write(path, head + README_BEGIN + "\n" + render_headline(res, goals) + README_END + tail)


def check_readme(path) -> str:
    """The text of README ``path``; ValueError unless it has exactly one generated results block."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such README")
    text = path.read_text(encoding="utf-8")
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{path}: needs exactly one {README_BEGIN!r} and one {README_END!r} line around the "
                         f"generated results block")
    return text


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
