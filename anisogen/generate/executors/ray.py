"""``--executor ray``: one Ray task per shard, with retries, running the same task function.

The driver (``pipelines/generate.py`` on the head node) plans tasks, runs the dedup scan and fits the
aligner exactly as the local executor does, then submits one ``@ray.remote`` task per pending shard.
Each Ray worker process builds its context once from the :class:`~anisogen.generate.context.ContextFactory`
(model, tokenizer, aligner loaded from ``OUT/aligner`` or ``--aligner-dir``, duplicate map) and reuses it
for later tasks of the same run, then calls :func:`anisogen.generate.task.run_task`. Because a task's
output depends only on its rows and the fingerprinted config, a retried or duplicated task rewrites
identical bytes; publishing is atomic.

Requirements: ``pip install 'anisogen[ray]'``; the output folder and the corpus must be on storage
every node sees. ``address="auto"`` joins a running cluster; without an address a local Ray instance is
started (this is how the tests run it on CPU).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..task import Task

_CONTEXT: dict[str, Any] = {}  # per Ray worker process: the context of the current run


def shard_task(make_context, task: tuple[int, int, int]) -> dict[str, Any]:
    """Body of one Ray task: publish shard ``task[0]`` (or return its record if already published)."""
    from ...shards import writer
    from ..task import run_task

    if _CONTEXT.get("key") != make_context.key:
        _CONTEXT.clear()
        _CONTEXT.update(key=make_context.key, ctx=make_context())
    ctx = _CONTEXT["ctx"]
    done = writer.check_published(ctx.outputs.out_dir, task[0], verify="size")
    if done is not None:
        return done
    return run_task(ctx.inputs, ctx.outputs, Task(*task))


def _init_ray(ray, address: str | None, num_cpus: int) -> bool:
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus
    # workers must import anisogen from the same tree as the driver
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                          "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                                          "TOKENIZERS_PARALLELISM": "false"}}
    ray.init(**kwargs)
    return True


def run_ray(tasks: list[Task], make_context, on_record: Callable[[dict], None], *, address: str | None = None,
            retries: int = 3, gpus_per_task: float = 0.0, num_cpus: int = 2) -> None:
    """Submit one Ray task per :class:`Task` and call ``on_record`` as each finishes (any order).

    ``make_context`` must be picklable and have a ``key`` (a :class:`ContextFactory`). A Ray instance the
    caller started is reused and left running; one started here is shut down at the end.
    """
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--executor ray needs Ray: pip install 'anisogen[ray]'") from exc
    started = _init_ray(ray, address, num_cpus)
    try:
        options: dict[str, Any] = {"max_retries": retries, "retry_exceptions": True, "num_cpus": 1}
        if gpus_per_task:
            options["num_gpus"] = gpus_per_task
        remote = ray.remote(shard_task).options(**options)
        factory = ray.put(make_context)
        refs = [remote.remote(factory, (t.index, t.start, t.stop)) for t in tasks]
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            on_record(ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()
