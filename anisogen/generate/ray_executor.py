"""``--executor ray``: one Ray task per shard, with retries, running the same task function.

The driver (``pipelines/generate.py`` on the head node) plans tasks, runs the dedup scan and fits the
aligner exactly as the default executor does, then submits one ``@ray.remote`` task per pending shard.
Each Ray worker process builds its context once (model, tokenizer, aligner loaded from ``OUT/aligner``
or ``--aligner-dir``, duplicate map) and reuses it for later tasks of the same run, then calls
:func:`anisogen.generate.task.run_task`. Because a task's output depends only on its rows and the
fingerprinted config, a retried or duplicated task rewrites identical bytes; publishing is atomic.

Requirements: ``pip install 'anisogen[ray]'``; the output folder and the corpus must be on storage
every node sees. ``--ray-address auto`` joins a running cluster; without it a local Ray instance is
started (this is how the tests run it on CPU).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Callable

_CONTEXT: dict[str, Any] = {}


def _worker_context(cfg_dict: dict[str, Any], model_fingerprint: str):
    """Build (once per worker process and config) the task inputs/outputs."""
    import torch

    from .config import GenerateConfig
    from .run import build_context

    key = repr(sorted(cfg_dict.items()))
    if _CONTEXT.get("key") != key:
        cfg = GenerateConfig(**cfg_dict)
        torch.set_num_threads(cfg.threads or 1)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
        inputs, outputs, *_rest = build_context(cfg, device, out=__import__("pathlib").Path(cfg.out))
        if outputs.model_fingerprint != model_fingerprint:
            raise RuntimeError(f"Ray worker loaded model {outputs.model_fingerprint!r}, driver has "
                               f"{model_fingerprint!r}: the same weights must be visible on every node")
        _CONTEXT.clear()
        _CONTEXT.update(key=key, inputs=inputs, outputs=outputs)
    return _CONTEXT["inputs"], _CONTEXT["outputs"]


def shard_task(cfg_dict: dict[str, Any], model_fingerprint: str, task: tuple[int, int, int]) -> dict[str, Any]:
    """Body of one Ray task: publish shard ``task[0]`` (or return its record if already published)."""
    from ..shards import writer
    from .task import Task, run_task

    inputs, outputs = _worker_context(cfg_dict, model_fingerprint)
    done = writer.check_published(outputs.out_dir, task[0], verify="size")
    if done is not None:
        return done
    return run_task(inputs, outputs, Task(*task))


def run_ray_tasks(cfg, tasks, model_fingerprint: str, on_record: Callable[[dict], None]) -> None:
    """Submit one Ray task per :class:`Task` and call ``on_record`` as each finishes (any order)."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--executor ray needs Ray: pip install 'anisogen[ray]'") from exc

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if cfg.ray_address:
            kwargs["address"] = cfg.ray_address
        else:
            kwargs["num_cpus"] = max(1, min(os.cpu_count() or 1, cfg.workers + 1 if cfg.workers else 2))
        # workers must import anisogen from the same tree as the driver
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                              "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                                              "TOKENIZERS_PARALLELISM": "false"}}
        ray.init(**kwargs)
        started = True
    try:
        options: dict[str, Any] = {"max_retries": cfg.ray_retries, "retry_exceptions": True, "num_cpus": 1}
        if cfg.ray_gpus_per_task:
            options["num_gpus"] = cfg.ray_gpus_per_task
        remote = ray.remote(shard_task).options(**options)
        cfg_dict = asdict(cfg)
        cfg_dict["progress"] = False
        cfg_ref = ray.put(cfg_dict)
        refs = [remote.remote(cfg_ref, model_fingerprint, (t.index, t.start, t.stop)) for t in tasks]
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            on_record(ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()
