"""The multi-process helper itself: results come back per rank, failures and hangs end fast."""

import time

import pytest
import torch
import torch.distributed as dist

from multiproc import RankFailed, run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return (rank, t.item())


def _rank1_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait forever without the fail-fast
    return rank


def _rank0_hangs(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_per_rank():
    assert run_ranks(_sum_ranks, 2) == [(0, 3.0), (1, 3.0)]


def test_failing_rank_reports_its_traceback_fast():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="(?s)rank 1 of 2 failed.*boom on rank one"):
        run_ranks(_rank1_raises, 2, timeout=120)
    assert time.monotonic() - start < 60


def test_hanging_rank_times_out():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] still running"):
        run_ranks(_rank0_hangs, 2, timeout=8)
