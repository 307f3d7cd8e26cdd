"""Joining a `torchrun` job: this process's rank, its device and the process group.

Launched without torchrun, a process is rank 0 of 1 and nothing is initialised. With it, CUDA ranks use
NCCL on their LOCAL_RANK device and CPU ranks use gloo.

    info, device = setup_distributed("auto")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from nanogpt.errors import UserError
from nanogpt.kernels.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(), device
    import torch.distributed as dist

    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]), True
    )
    if device.type == "mps":
        raise UserError("distributed training does not support MPS; use --device cpu or CUDA GPUs")
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_gather(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's `obj` (a collective under DDP: all ranks must call it at the same step)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
