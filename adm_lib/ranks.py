"""Data-parallel ranks under torchrun: joining the process group, and
gathering, broadcasting and summing across it.

Foundation (hand-written; the runs appendix shows two processes training
as one). One process is a run of world size 1, so the loop has one path.
"""

__all__ = [
    "Ranks",
    "setup_ranks",
    "gather_rows",
    "from_rank0",
    "sum_ranks",
    "data_parallel",
    "micro_sync",
]


import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from adm_lib.devices import resolve_device
from adm_lib.errors import TrainError


@dataclass
class Ranks:
    """This process's place in a (possibly one-process) data-parallel run."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # whether train() opened the process group

    @property
    def main(self) -> bool:
        """Rank 0 logs, samples and writes checkpoints."""
        return self.rank == 0


def setup_ranks(device: str) -> Ranks:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise TrainError(str(err)) from None
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size == 1:
        return Ranks(0, 1, dev, False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), dev, owns)


def gather_rows(ranks: Ranks, rows: Tensor) -> Tensor:
    """Every rank's rows, concatenated in rank order (the global batch)."""
    if ranks.world_size == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(ranks.world_size)]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def from_rank0(ranks: Ranks, *values: Any) -> list[Any]:
    """Rank 0's `values` (picklable), on every rank."""
    values = list(values)
    if ranks.world_size > 1:
        dist.broadcast_object_list(values)
    return values


def sum_ranks(ranks: Ranks, values: Tensor) -> Tensor:
    """The sum over ranks of a tensor."""
    if ranks.world_size > 1:
        dist.all_reduce(values)
    return values


def micro_sync(model: nn.Module,
               last: bool) -> contextlib.AbstractContextManager[None]:
    """DDP's `no_sync` unless `last`, through a torch.compile wrapper."""
    # torch.compile(DDP(...)) is an OptimizedModule holding the DDP module.
    ddp = getattr(model, "_orig_mod", model)
    if isinstance(ddp, DistributedDataParallel) and not last:
        return ddp.no_sync()
    return contextlib.nullcontext()


def data_parallel(model: nn.Module,
                  device: torch.device) -> DistributedDataParallel:
    """`model` in DDP, its gradients views of the all-reduce buckets."""
    # The views save a copy between gradients and buckets each step, and
    # a gradient's worth of memory.
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        gradient_as_bucket_view=True)
