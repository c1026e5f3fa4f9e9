"""megatron-core's dataset index helpers: built from source when an install lacks them."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moc_megatron.data.helpers import ensure_dataset_helpers

SIZES = [5, 17, 3, 40, 9, 12]
DOCUMENTS = [3, 0, 5, 1, 2, 4] + [2, 5, 0, 4, 1, 3]  # two epochs, each a permutation of the documents


def sample_index(helpers) -> list:
    """megatron-core's GPT sample index of a small fixed case, through its helpers module."""
    return helpers.build_sample_idx(np.array(SIZES, dtype=np.int32), np.array(DOCUMENTS, dtype=np.int32),
                                    8, 2, sum(SIZES), True, True).tolist()


def test_ensure_returns_the_installed_helpers():
    from megatron.core.datasets import helpers_cpp

    assert ensure_dataset_helpers() is helpers_cpp


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_missing_helpers_are_compiled_and_used_by_megatron_core(tmp_path):
    """In a fresh process where the shipped library cannot be imported (as after a source install)."""
    from megatron.core.datasets import helpers

    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["megatron.core.datasets.helpers_cpp"] = None  # importing it now fails
        sys.path.insert(0, {str(tmp_path.parent)!r})
        from moc_megatron.data.helpers import ensure_dataset_helpers
        module = ensure_dataset_helpers({str(tmp_path / "build")!r})
        from megatron.core.datasets import helpers
        sys.path.insert(0, {str(__import__("os").path.dirname(__file__))!r})
        from test_data_helpers import sample_index
        print(json.dumps([module.__file__, sample_index(helpers)]))
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    library, index = json.loads(out.stdout.strip().splitlines()[-1])
    assert library.startswith(str(tmp_path / "build"))
    assert index == sample_index(helpers) and len(index) > 5
