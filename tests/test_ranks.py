"""adm_lib.ranks (foundation): joining torchrun's group, and gathering,
broadcasting and summing across it, checked with two CPU processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adm_lib.errors import TrainError
from adm_lib.ranks import (
    data_parallel,
    from_rank0,
    gather_rows,
    micro_sync,
    setup_ranks,
    sum_ranks,
)


def test_one_process_is_rank_0_of_1(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = setup_ranks("cpu")
    assert (ranks.rank, ranks.world_size, ranks.main) == (0, 1, True)
    assert not ranks.owns_group and not dist.is_initialized()
    rows = torch.arange(3.0)
    assert gather_rows(ranks, rows) is rows
    assert from_rank0(ranks, "a", 1) == ["a", 1]
    assert sum_ranks(ranks, rows) is rows


def test_an_unknown_device_is_named(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TrainError, match="tpu"):
        setup_ranks("tpu")


def _two_ranks(rank: int, port: int) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = setup_ranks("cpu")
    try:
        assert (ranks.rank, ranks.world_size, ranks.owns_group) == (rank, 2,
                                                                   True)
        rows = torch.full((2, 3), float(rank))
        assert gather_rows(ranks, rows).tolist() == [[0.0] * 3] * 2 + [
            [1.0] * 3] * 2
        assert from_rank0(ranks, f"rank {rank}") == ["rank 0"]
        assert sum_ranks(ranks, torch.tensor([rank + 1.0])).item() == 3.0
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = data_parallel(nn.Linear(3, 1, bias=False), ranks.device)
        x = torch.full((1, 3), rank + 1.0)
        with micro_sync(model, last=False):  # no all-reduce: own gradient
            model(x).sum().backward()
        weight = model.module.weight
        assert weight.grad.tolist() == [[rank + 1.0] * 3]
        with micro_sync(model, last=True):  # all-reduced: the mean
            model(x).sum().backward()
        # (own 2 micro-batches: 2 (r + 1)), averaged over ranks: 3
        assert weight.grad.tolist() == [[3.0] * 3]
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_broadcast_sum_and_sync_only_the_last_micro_batch(
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port,), nprocs=2)


def test_micro_sync_of_a_plain_module_does_nothing() -> None:
    with micro_sync(nn.Linear(2, 2), last=False) as held:
        assert held is None
