"""Launch scripts: each documents itself and parses; two "nodes" on this machine train together, once
through torchrun's c10d rendezvous and once through the deepspeed launcher with a hostfile (no ssh)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from multiproc import free_port
from test_train_cli import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "launch_scripts")
LAUNCHERS = ["single_node_torchrun.sh", "single_node_deepspeed.sh", "multi_node_torchrun.sh",
             "multi_node_deepspeed.sh", "slurm.sbatch"]
TINY_RUN = ["--num-layers", "2", "--memory-layers", "1", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr-warmup-iters", "1", "--train-iters", "3", "--log-interval", "1",
            "--eval-interval", "0"]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launch_script_documents_its_usage_and_parses(script):
    path = os.path.join(SCRIPTS, script)
    lines = open(path).read().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and os.access(path, os.X_OK)
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 4 and any(script in line for line in header), "the header must show how to run it"
    assert subprocess.run(["bash", "-n", path]).returncode == 0


def _two_nodes(tmp_path, script: str, env_of_node) -> list[dict]:
    """Start two launcher processes for one run; return rank 0's JSON lines."""
    log = tmp_path / "log.jsonl"
    base = clean_env(PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen(["bash", os.path.join(SCRIPTS, script), *TINY_RUN, "--log-jsonl", str(log)],
                              env={**base, **env_of_node(node)}, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
    assert any("world 2 = dp 2" in out for out in outputs)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    return records


@pytest.fixture(scope="module")
def torchrun_records(tmp_path_factory):
    return _two_nodes(tmp_path_factory.mktemp("torchrun"), "multi_node_torchrun.sh",
                      lambda node: {"NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ID": f"test-{os.getpid()}"})


@pytest.mark.slow
def test_two_nodes_with_torchrun_rendezvous_train_together(torchrun_records):
    assert torchrun_records[-1]["iteration"] == 3


@pytest.mark.slow
def test_two_nodes_with_deepspeed_hostfile_train_together_like_torchrun(tmp_path, torchrun_records):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    ds = _two_nodes(tmp_path, "multi_node_deepspeed.sh",
                    lambda node: {"HOSTFILE": str(tmp_path / "hostfile"), "NO_SSH": "1", "NODE_RANK": str(node)})
    assert [r["loss"] for r in ds] == [r["loss"] for r in torchrun_records]  # same data and math, either launcher
