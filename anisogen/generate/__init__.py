"""Generation: corpus -> CLIP text tower -> aligner -> WebDataset shards (resumable, exactly-once).

``generate(GenerateConfig(...))`` runs or resumes a generation (see :mod:`.run`); the per-shard task
function lives in :mod:`.task`, the context it runs with in :mod:`.context`, and the executors (local
accelerate/Slurm ranks, Ray) in :mod:`.executors`. Names are imported on first use, so the command line's
``--help`` does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "GenerateConfig": ".config", "GenerateInputError": ".config",
    "Context": ".context", "ContextFactory": ".context", "build_context": ".context",
    "FaultInjector": ".faults",
    "ConfigMismatch": ".run", "Dist": ".run", "format_summary": ".run", "generate": ".run",
    "Task": ".task", "TaskInputs": ".task", "TaskOutputs": ".task", "assign": ".task", "encode_task": ".task",
    "plan_tasks": ".task", "prepare_task": ".task", "run_task": ".task", "write_task": ".task",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
