"""dist_state.Chunks: a rank's range of a weight's elements (a ZeRO fragment) as DCP chunks of the
global tensor, written from and read into the flat buffer in place."""

import itertools
import math

import pytest
import torch

from moc_megatron.training.dist_state import Chunks, _boxes, _read, _write
from tests.multiproc import run_ranks


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (1, 1, 5), (4, 1, 3)])
def test_boxes_tile_every_range_in_order(shape):
    n_all = math.prod(shape)
    for start, n in itertools.product(range(n_all), range(n_all + 1)):
        if start + n > n_all:
            continue
        filled, at = torch.full(shape, -1), 0
        for offsets, sizes in _boxes(start, n, shape):
            region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            assert (filled[region] == -1).all(), "boxes overlap"
            filled[region] = torch.arange(start + at, start + at + math.prod(sizes)).view(sizes)
            at += math.prod(sizes)
        expected = torch.full((n_all,), -1)
        expected[start:start + n] = torch.arange(start, start + n)
        assert at == n and torch.equal(filled.view(-1), expected), (start, n)
    assert len(_boxes(5, 20, (3, 4, 5))) == 2  # a partial row's tail, then a whole row


def _save_fragments(rank, world_size, folder, cuts):
    """Rank r holds elements [cuts[r], cuts[r + 1]) of a [6, 10] weight, as ZeRO partitions it; both write,
    then each reads back a column half (as tensor parallelism along dim 1 would hold it)."""
    full = torch.arange(60, dtype=torch.float32).view(6, 10)
    flat = full.view(-1)[cuts[rank]:cuts[rank + 1]].clone()
    _write({"w": Chunks(flat, cuts[rank], (6, 10), [0, 0], [6, 10]), "step": torch.tensor(3.0)}, folder)
    half = torch.zeros(6, 5)
    step = torch.zeros(())
    _read(folder, {"w": Chunks(half.view(-1), 0, (6, 5), [0, 5 * rank], [6, 10]), "step": step})
    return half, step


def test_fragments_written_by_two_ranks_read_back_at_another_split(tmp_path):
    cuts = [0, 23, 60]  # not on a row boundary
    halves = run_ranks(_save_fragments, world_size=2, args=(str(tmp_path), cuts), timeout=120)
    full = torch.arange(60, dtype=torch.float32).view(6, 10)
    for rank, (half, step) in enumerate(halves):
        assert torch.equal(half, full[:, 5 * rank:5 * rank + 5]) and float(step) == 3.0
    # and in one process without torch.distributed, into a range of its own
    from torch.distributed.checkpoint import FileSystemReader
    import torch.distributed.checkpoint as dcp

    from moc_megatron.training.dist_state import _LoadPlanner

    part = torch.zeros(17)
    dcp.load({"w": Chunks(part, 31, (6, 10), [0, 0], [6, 10])}, storage_reader=FileSystemReader(str(tmp_path)),
             planner=_LoadPlanner(), no_dist=True)
    assert torch.equal(part, full.view(-1)[31:48])
