"""Stopping cleanly before --train-iters: --exit-interval, --exit-duration-in-mins, --exit-signal-handler.

Each stop saves a checkpoint at the step it stopped after and exits 0; resuming with --load continues
bitwise as the run that never stopped. A signal that reaches one rank stops every rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from moc_megatron.parallel.net import free_port
from moc_megatron.training import checkpoint
from moc_megatron.training.exit import Exits
from multiproc import run_ranks
from test_train import tiny
from test_train_cli import FAST, ROOT, clean_env

# ---------------------------------------------------------------------------------------------
# Exits on its own


def _cfg(interval=None, minutes=None, handler=False, sig="SIGTERM"):
    return SimpleNamespace(training=SimpleNamespace(exit_interval=interval, exit_duration_in_mins=minutes,
                                                    exit_signal_handler=handler, exit_signal=sig))


class CountingWorld:
    """A stand-in world of two ranks that counts all-reduces (the other rank's flags are all 0)."""

    def __init__(self, monkeypatch):
        import torch.distributed as dist

        self.calls = 0
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, group=None):
        self.calls += 1


def test_exit_interval_stops_on_multiples_without_a_collective(monkeypatch):
    world = CountingWorld(monkeypatch)
    exits = Exits(_cfg(interval=3))
    assert [exits.check(i, "cpu") for i in range(1, 7)] == [None, None, "--exit-interval 3", None, None,
                                                             "--exit-interval 3"]
    assert world.calls == 0


def test_no_exit_option_means_no_collective(monkeypatch):
    world = CountingWorld(monkeypatch)
    exits = Exits(_cfg())
    assert all(exits.check(i, "cpu") is None for i in range(1, 5)) and world.calls == 0


def test_duration_counts_from_the_given_start(monkeypatch):
    world = CountingWorld(monkeypatch)
    assert Exits(_cfg(minutes=10)).check(1, "cpu") is None
    assert "--exit-duration-in-mins 10" in Exits(_cfg(minutes=10), started=time.monotonic() - 601).check(1, "cpu")
    assert world.calls == 2  # one all-reduce per check, whatever the clock says


def test_signal_handler_only_sets_a_flag_and_restores_the_previous_handler(monkeypatch):
    world = CountingWorld(monkeypatch)
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(a[0]))
    try:
        exits = Exits(_cfg(handler=True, sig="SIGUSR1"))
        assert exits.check(1, "cpu") is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert exits.received and seen == []
        assert exits.check(2, "cpu") == "SIGUSR1 received (--exit-signal-handler)" and world.calls == 2
        exits.close()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_exit_flags_are_validated():
    from moc_megatron.errors import UserError

    with pytest.raises(UserError, match="--exit-interval=0"):
        tiny(exit_interval=0).validate()
    with pytest.raises(UserError, match="--exit-duration-in-mins=-1"):
        tiny(exit_duration_in_mins=-1.0).validate()
    with pytest.raises(UserError, match="--exit-signal=SIGKILL"):
        tiny(exit_signal="SIGKILL").validate()


# ---------------------------------------------------------------------------------------------
# In a training run (one process)


def _interval_and_duration(rank, world_size, root):
    from moc_megatron.training.trainer import train

    out = {}
    d = f"{root}/interval"  # --load is --save: the first start of an empty directory begins at 0
    first = train(tiny(train_iters=6, exit_interval=2, save=d, load=d))
    second = train(tiny(train_iters=6, exit_interval=2, save=d, load=d))
    out["interval"] = [(r.start_iteration, r.iteration, r.exit_reason) for r in (first, second)]
    out["interval_latest"] = checkpoint.latest_tag(d)
    d = f"{root}/duration"
    run = train(tiny(train_iters=5, exit_duration_in_mins=0.001, save=d))
    out["duration"] = (run.iteration, run.exit_reason, checkpoint.latest_tag(d))
    return out


@pytest.fixture(scope="module")
def stops(tmp_path_factory):
    return run_ranks(_interval_and_duration, 1, (str(tmp_path_factory.mktemp("exit")),), timeout=300)[0]


@pytest.mark.slow
def test_exit_interval_saves_and_stops_then_resume_stops_at_the_next_multiple(stops):
    assert stops["interval"] == [(0, 2, "--exit-interval 2"), (2, 4, "--exit-interval 2")]
    assert stops["interval_latest"] == "iter_0000004"


@pytest.mark.slow
def test_exit_duration_stops_after_the_first_step_with_a_checkpoint(stops):
    iteration, reason, latest = stops["duration"]
    assert iteration == 1 and "--exit-duration-in-mins 0.001" in reason and latest == "iter_0000001"


# ---------------------------------------------------------------------------------------------
# Signals to a 2-rank torchrun run

ITERS = 30
TORCHRUN = [*FAST, "--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "0"]


def _torchrun(args: list[str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "moc_megatron.train", *TORCHRUN, *args, "--log-jsonl", str(log)]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _losses(path) -> dict:
    if not os.path.exists(path):
        return {}
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def _wait_for_iteration(log, proc, at_least: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while max(_losses(log), default=0) < at_least:
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no iteration {at_least} logged:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (its children)."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ").read().split("\0") if parent == launcher_pid else []
        except OSError:  # gone meanwhile
            continue
        rank = [kv[5:] for kv in env if kv.startswith("RANK=")]
        if rank:
            pids[int(rank[0])] = int(pid)
    return pids


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Losses of the run that never stops."""
    log = tmp_path_factory.mktemp("straight") / "log.jsonl"
    proc = _torchrun([], log)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    return _losses(log)


def _stopped_at(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("stopped at iteration"))
    return int(line.split()[3])


@pytest.mark.slow
def test_sigterm_to_the_launch_script_saves_exits_0_and_resumes_bitwise(tmp_path, straight):
    """launch_scripts/single_node_torchrun.sh hands SIGTERM to the training processes, not to torchrun
    (which would exit 1 after forwarding it): every worker saves and exits 0, and so do torchrun and the
    script."""
    ckpt, log = str(tmp_path / "ckpt"), tmp_path / "first.jsonl"
    env = clean_env(OMP_NUM_THREADS="1", NPROC="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    first = subprocess.Popen(["bash", "launch_scripts/single_node_torchrun.sh", *TORCHRUN, "--save", ckpt, "--load",
                              ckpt, "--exit-signal-handler", "--log-jsonl", str(log)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_iteration(log, first, 2)
    first.send_signal(signal.SIGTERM)  # to the script only, not its process group
    out = _finish(first)
    assert first.returncode == 0 and "Traceback" not in out, out[-3000:]
    k = _stopped_at(out)
    assert f"of {ITERS}: SIGTERM received (--exit-signal-handler); checkpoint {checkpoint.tag_of(k)}" in out
    assert 2 <= k < ITERS and checkpoint.latest_tag(ckpt) == checkpoint.tag_of(k)
    second = _torchrun(["--save", ckpt, "--load", ckpt], tmp_path / "second.jsonl")
    out = _finish(second)
    assert second.returncode == 0, out[-3000:]
    first_losses, second_losses = _losses(log), _losses(tmp_path / "second.jsonl")
    assert sorted(first_losses) == list(range(1, k + 1)) and sorted(second_losses) == list(range(k + 1, ITERS + 1))
    assert {**first_losses, **second_losses} == straight  # bitwise: floats survive JSON exactly


@pytest.mark.slow
def test_signal_to_one_rank_stops_both(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    proc = _torchrun(["--save", ckpt, "--exit-signal-handler", "--exit-signal", "SIGUSR1"], tmp_path / "log.jsonl")
    _wait_for_iteration(tmp_path / "log.jsonl", proc, 1)
    pids = _rank_pids(proc.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGUSR1)  # rank 1 only; rank 0 learns it from the all-reduce
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]  # every worker exited 0, so torchrun does too
    k = _stopped_at(out)
    assert "SIGUSR1 received" in out and k < ITERS and checkpoint.latest_tag(ckpt) == checkpoint.tag_of(k)
    assert max(_losses(tmp_path / "log.jsonl")) == k


@pytest.mark.slow
def test_slurm_script_forwards_usr1_to_training_saves_and_requeues(tmp_path):
    """launch_scripts/slurm.sbatch under stand-in srun and scontrol: SIGUSR1 to the batch shell (what
    --signal=B:USR1@300 sends) reaches the training processes, which save and stop; the job requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\ncase "$1" in\n  show) echo 127.0.0.1 ;;\n'
                                      '  requeue) echo "$2" > "$REQUEUED" ;;\nesac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    ckpt, log = str(tmp_path / "ckpt"), tmp_path / "log.jsonl"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, MOC_ROOT=ROOT,
                    SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_JOB_ID="42", GPUS_PER_NODE="2",
                    MASTER_PORT=str(free_port()), SHUTDOWN_TIMEOUT="60", REQUEUED=str(tmp_path / "requeued"),
                    OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch_scripts", "slurm.sbatch"), *TORCHRUN,
                             "--save", ckpt, "--load", ckpt, "--log-jsonl", str(log)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_iteration(log, proc, 1)
    proc.send_signal(signal.SIGUSR1)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    k = _stopped_at(out)
    assert "SIGUSR1 received" in out and k < ITERS and checkpoint.latest_tag(ckpt) == checkpoint.tag_of(k)
    assert (tmp_path / "requeued").read_text().strip() == "42" and "requeueing job 42" in out
