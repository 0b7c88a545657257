"""One asynchronous device-to-host copy per task: pinned host memory, a side stream, an event to wait on.

On CUDA, :meth:`HostCopies.start` queues the copies of a task's stored arrays on a copy stream that waits
for the compute stream, and returns at once; the next task's encoding is queued behind it on the compute
stream, so copy and compute overlap. The background writer calls :meth:`PendingCopy.wait` just before it
needs the bytes. Host buffers come from torch's caching pinned allocator, so they are reused, not
re-pinned. On CPU there is nothing to copy: the tensors are viewed as NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingCopy:
    """Host tensors being filled, and the event that marks the end of the copy (``None`` on CPU)."""

    tensors: list[torch.Tensor]
    event: "torch.cuda.Event | None" = None

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors


class HostCopies:
    """Starts the per-task device-to-host copies for one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, *tensors: torch.Tensor) -> PendingCopy:
        if self.stream is None:
            return PendingCopy([t.detach().cpu() for t in tensors])
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        hosts = []
        with torch.cuda.stream(self.stream):
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # keep the device block alive until the copy is done
                hosts.append(host)
            event = torch.cuda.Event()
            event.record(self.stream)
        return PendingCopy(hosts, event)
