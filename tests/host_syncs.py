"""Count the operations that make a GPU host wait, on any device (used by tests/test_host_syncs.py).

Under a TorchDispatchMode every aten call is seen: a scalar read (item, bool, float), nonzero,
unique, masked_select, bincount and boolean indexing each need the device's result on the host.
Tensor.tolist is counted by a wrapper. On a GPU, torch.cuda.set_sync_debug_mode("error") makes the
same check, and tools can use it there.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.masked_select.default, aten.bincount.default, aten.item.default}


def _boolean_index(func, args) -> bool:
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.counts[str(func.overloadpacket.__name__)] += 1
        elif _boolean_index(func, args):
            self.counts["boolean index"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def count_host_syncs():
    """with count_host_syncs() as c: ...; c.counts -> Counter of syncing ops (tolist included)."""
    counter = HostSyncCounter()
    original = torch.Tensor.tolist

    def tolist(self):
        counter.counts["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = original
