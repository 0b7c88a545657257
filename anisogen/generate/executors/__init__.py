"""Executors: each runs a list of tasks with ``(tasks, make_context, on_record)`` and imports nothing from
:mod:`anisogen.generate.run` (in the style of img2dataset's distributors).

* :func:`.local.run_local`: this process's tasks through a DataLoader (workers prepare), the device step
  in the main thread and a background writer. Used by accelerate ranks and by Slurm array workers (whose
  global rank is ``worker_index * group + local rank``).
* :func:`.ray.run_ray`: one Ray task per shard, retried on failure; workers build their context once.
"""

from .local import StreamPlan, run_local

__all__ = ["StreamPlan", "run_local"]
