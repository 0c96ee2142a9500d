"""Several processes (torchrun): who this process is, and the few collectives the loop needs.

Nothing here starts a process group as a side effect: the command lines call
``init_distributed()`` first; a library user under torchrun calls it once before training.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def launched_world() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group (once; a no-op in a single process); returns ``(rank, world)``."""
    import torch.distributed as dist

    if launched_world() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return distributed()


def distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless a process group was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched_world() > 1:
        raise RuntimeError(
            f"this process is one of {launched_world()} started by torchrun, but no process group was joined: "
            "call distributed.init_distributed() before training (the command lines do)"
        )
    return 0, 1


def is_main_process() -> bool:
    return distributed()[0] == 0


def barrier() -> None:
    if distributed()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if distributed()[1] == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values


def average_buffers(module: nn.Module) -> None:
    """Average BN running statistics over ranks: DDP syncs them only at the start of a forward,
    so each rank's last batch leaves them slightly different."""
    world = distributed()[1]
    if world == 1:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)
