"""Data parallelism over processes: one context object, set up from ``torchrun``'s variables.

``torchrun --nproc_per_node N -m lorank train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :meth:`DistContext.from_env` then joins
the process group with ``nccl`` on GPUs and ``gloo`` on CPUs.  Without those variables (or with
``WORLD_SIZE=1``) everything runs in one process and the collectives are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:<local_rank>`` when a GPU is present, else ``cpu``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but this machine has no usable CUDA "
                         f"device (torch.cuda.is_available() is False): use --device cpu or "
                         f"auto")
    return dev


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @classmethod
    def from_env(cls, device: str | torch.device = "auto") -> DistContext:
        """Join the process group if ``WORLD_SIZE > 1`` (launched by torchrun)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        dev = resolve_device(device, local)
        if world <= 1:
            return cls(0, 1, 0, dev, None)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        return cls(rank, world, local, dev, backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Sum a float64 vector over ranks (a copy; the identity in one process)."""
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t.cpu()
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (if this context joined one)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["DistContext", "resolve_device"]
