"""Generation: corpus -> CLIP text tower -> aligner -> WebDataset shards (resumable, exactly-once).

``generate(GenerateConfig(...))`` runs or resumes a generation (see :mod:`.run`); the per-shard task
function lives in :mod:`.task` and is shared by the accelerate and Ray executors.
"""

from .config import GenerateConfig
from .run import ConfigMismatch, Dist, build_context, format_summary, generate
from .task import Task, TaskInputs, TaskOutputs, assign, finish_task, plan_tasks, prepare_task, run_task

__all__ = [
    "GenerateConfig", "generate", "ConfigMismatch", "Dist", "build_context", "format_summary", "Task",
    "TaskInputs", "TaskOutputs", "assign", "finish_task", "plan_tasks", "prepare_task", "run_task",
]
