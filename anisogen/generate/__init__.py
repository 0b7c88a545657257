"""Generation: corpus -> CLIP text tower -> aligner -> WebDataset shards (resumable, exactly-once).

``generate(GenerateConfig(...))`` runs or resumes a generation (see :mod:`.run`); the per-shard task
function lives in :mod:`.task`, the context it runs with in :mod:`.context`, and the executors (local
accelerate/Slurm ranks, Ray) in :mod:`.executors`.
"""

from .config import GenerateConfig
from .context import Context, ContextFactory, build_context
from .faults import FaultInjector
from .run import ConfigMismatch, Dist, format_summary, generate
from .task import Task, TaskInputs, TaskOutputs, assign, encode_task, plan_tasks, prepare_task, run_task, write_task

__all__ = [
    "GenerateConfig", "generate", "ConfigMismatch", "Dist", "Context", "ContextFactory", "build_context",
    "FaultInjector", "format_summary", "Task", "TaskInputs", "TaskOutputs", "assign", "encode_task", "plan_tasks",
    "prepare_task", "run_task", "write_task",
]
