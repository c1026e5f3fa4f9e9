import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def ctx():
    """A single-process ParallelContext (gloo world of one), shared by the tests of one session."""
    from moc_megatron.parallel.state import single_process

    return single_process()


@pytest.fixture
def repo_root():
    return ROOT
