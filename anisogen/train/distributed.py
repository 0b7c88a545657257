"""Data parallelism through accelerate: DDP, FSDP2 and DeepSpeed ZeRO, chosen by the accelerate config.

The trainer never branches on the launcher beyond this module:

* :func:`make_accelerator` builds the ``Accelerator``. ``accelerate launch --config_file`` (see
  ``docs/accelerate/``) selects DDP, FSDP or DeepSpeed. accelerate only turns FSDP on for accelerator
  devices; torch's FSDP2 (``fully_shard``) also runs on CPU with gloo, so a CPU launch that asks for
  FSDP (``ACCELERATE_USE_FSDP=true``, FSDP version 2) gets it here instead of silently falling back to
  DDP. FSDP1 on CPU is refused in one line.
* :func:`prepare` prepares the model *and* the optimizer together (FSDP2 swaps the optimizer's
  parameters for the sharded ones; DeepSpeed builds its engine around both).
* :func:`full_params` gathers a sharded root's own parameters for code that runs the LM outside the
  root's ``forward`` (generation).
"""

from __future__ import annotations

import contextlib
import os

import torch

#: What the trainer calls the parallelism in logs, run summaries and checkpoints.
KINDS = ("single", "ddp", "fsdp", "deepspeed")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(*, mixed_precision: str, log_with, project_dir: str):
    """The run's ``Accelerator`` (see the module docstring); FSDP on CPU is enabled here."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    cuda = torch.cuda.is_available()
    acc = Accelerator(
        cpu=not cuda, mixed_precision=mixed_precision, log_with=log_with or None, project_dir=project_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)],
    )
    if _truthy("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        _enable_cpu_fsdp(acc)
    return acc


def _enable_cpu_fsdp(acc) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # reads FSDP_* env
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU needs fsdp_version 2 (torch's FSDP1 needs an accelerator device); set "
                         "fsdp_version: 2 in the accelerate config or pass --fsdp_version 2")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    from accelerate.state import PartialState

    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # AcceleratorState() re-reads the process state on every construction: keep both in agreement
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def kind(acc) -> str:
    """``single`` | ``ddp`` | ``fsdp`` | ``deepspeed``."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def is_sharded(acc) -> bool:
    """True when parameters are sharded across ranks (FSDP, DeepSpeed): exports and checkpoints gather."""
    return kind(acc) in ("fsdp", "deepspeed")


def prepare(acc, model, optimizer, *, batch_size: int, grad_accum: int, max_grad_norm: float):
    """Wrap model and optimizer together; returns ``(model, optimizer)`` ready for the loop.

    Under DeepSpeed the engine's micro-batch size and accumulation come from the trainer (its own
    accumulation window) and clipping stays with :meth:`Accelerator.clip_grad_norm_`.
    """
    if kind(acc) == "deepspeed":
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = batch_size
        ds["gradient_accumulation_steps"] = grad_accum
        ds["train_batch_size"] = batch_size * grad_accum * acc.num_processes
        ds["gradient_clipping"] = max_grad_norm if max_grad_norm > 0 else 0.0
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer


def base_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper (the scheduler and checkpoints use it)."""
    return getattr(optimizer, "optimizer", optimizer)


@contextlib.contextmanager
def full_params(model):
    """Unshard an FSDP2 root's own parameters for the duration (no-op otherwise).

    Decoder layers wrapped on their own unshard themselves in their forward hooks; the root's
    parameters (embeddings, final norm, head, projector, extras) are only gathered inside the root's
    ``forward``, so code that calls ``model.lm.generate`` directly needs this. Collective.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
