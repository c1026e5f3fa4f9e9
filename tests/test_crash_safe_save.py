"""Crash-safe checkpoints: a run SIGKILLed at any point of a save resumes from a complete checkpoint;
files written under a temporary name get the permissions the umask gives.

The kill points come from checkpoint.py's test hook (MOC_TEST_PAUSE_IN_SAVE): the save writes a marker
and sleeps there, and the test kills the whole process group.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from moc_megatron.files import as_umask_allows, current_umask
from moc_megatron.training import checkpoint
from test_train_checkpoint import _save
from test_train_cli import FAST, ROOT, clean_env

RUN = [*FAST, "--train-iters", "3", "--save-interval", "1", "--keep-last", "1", "--log-interval", "1",
       "--eval-interval", "0"]


def _train(tmp_path, log: str, env: dict | None = None) -> subprocess.Popen:
    ckpt = str(tmp_path / "ckpt")
    return subprocess.Popen([sys.executable, "-m", "moc_megatron.train", *RUN, "--save", ckpt, "--load", ckpt,
                             "--log-jsonl", str(tmp_path / log)], cwd=ROOT, env=clean_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(marker: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not glob.glob(marker + ".rank*"):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before pausing:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no pause marker after {timeout:.0f}s")
        time.sleep(0.1)


def _losses(path) -> dict:
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def _complete(path: str) -> bool:
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    return ({checkpoint.META, "rng_rank00000.pt"} <= names
            and all(os.path.isfile(os.path.join(path, d, ".metadata")) for d in ("model", "optim")))


# after the kill at iteration 2's save: the checkpoint `latest` must name
RESUMES_FROM = {"model": 1, "optimizer": 1, "meta": 1, "latest": 1, "prune": 2}


@pytest.mark.slow
@pytest.mark.parametrize("point", checkpoint.PAUSE_POINTS)
def test_run_killed_inside_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, point):
    assert set(RESUMES_FROM) == set(checkpoint.PAUSE_POINTS)
    marker = str(tmp_path / "paused")
    proc = _train(tmp_path, "killed.jsonl", {"MOC_TEST_PAUSE_IN_SAVE": f"{point}@2", "MOC_TEST_PAUSE_MARKER": marker})
    try:
        _wait_for(marker, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    ckpt = tmp_path / "ckpt"
    want = checkpoint.tag_of(RESUMES_FROM[point])
    assert checkpoint.latest_tag(str(ckpt)) == want and _complete(str(ckpt / want)), sorted(os.listdir(ckpt))

    resumed = _train(tmp_path, "resumed.jsonl")
    out = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed from {ckpt} at iteration {RESUMES_FROM[point]}" in out
    assert "saved at TP 1 x PP 1 x EP 1 x DP 1, ZeRO 1; the same layout" in out
    names = os.listdir(ckpt)
    assert [n for n in names if n.startswith("iter_")] == ["iter_0000003"], names  # no .tmp, .old or .del left
    killed, again = _losses(tmp_path / "killed.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert min(again) == RESUMES_FROM[point] + 1
    for it in set(killed) & set(again):
        assert again[it] == killed[it], it  # the resumed run repeats the killed one bitwise
    mode = 0o666 & ~current_umask()
    for f in glob.glob(str(ckpt / "iter_0000003" / "**"), recursive=True):
        if os.path.isfile(f):
            assert os.stat(f).st_mode & 0o777 == mode, f


def test_resave_over_the_latest_checkpoint_killed_between_renames_stays_loadable(tmp_path, ctx, monkeypatch):
    """Saving iteration N again while ``latest`` names N: a kill after the old one moved aside and before
    the new one is renamed in leaves N.old, which latest_tag() reads; the next save puts it back."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    rename, calls = os.rename, []

    def dies_on_the_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    monkeypatch.setattr(os, "rename", rename)
    assert checkpoint.latest_tag(str(tmp_path)) == "iter_0000002.old"
    assert _meta_iteration(tmp_path / "iter_0000002.old") == 2
    _save(tmp_path, 3)
    assert checkpoint.latest_tag(str(tmp_path)) == "iter_0000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", "iter_0000003", "latest"]


def test_keep_last_never_deletes_the_checkpoint_latest_names(tmp_path, ctx):
    """A new run saving iteration 1 into a directory that holds iteration 5 of an earlier run."""
    _save(tmp_path, 5)
    _save(tmp_path, 1, keep_last=1)
    assert checkpoint.latest_tag(str(tmp_path)) == "iter_0000001" and (tmp_path / "iter_0000001").is_dir()


def _meta_iteration(path) -> int:
    return json.load(open(path / checkpoint.META))["iteration"]


# ---------------------------------------------------------------------------------------------
# Permissions of files renamed into place


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask and current_umask() == umask


def test_private_temporary_file_gets_the_umask_permissions(tmp_path, umask):
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    folder = tempfile.mkdtemp(dir=tmp_path)
    as_umask_allows(name)
    as_umask_allows(folder)
    assert os.stat(name).st_mode & 0o777 == {0o022: 0o644, 0o002: 0o664}[umask]
    assert os.stat(folder).st_mode & 0o777 == {0o022: 0o755, 0o002: 0o775}[umask]


def test_hf_export_files_are_readable_as_the_umask_allows(ctx, repo_root, tmp_path, umask):
    from moc_megatron.config import load_config
    from moc_megatron.hf.convert import save_hf
    from moc_megatron.model.gpt import MoCModel

    cfg = load_config(f"{repo_root}/configs/models/moc-tiny.yaml", model=dict(num_layers=2),
                      memory=dict(layers=[1]), training=dict(seq_length=32)).validate()
    out = tmp_path / "hf"
    save_hf(MoCModel(cfg, ctx).state_dict(), cfg.to_dict(), out)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert os.stat(out).st_mode & 0o777 == dir_mode
    assert (out / "model.safetensors").exists()
    for f in out.iterdir():
        assert os.stat(f).st_mode & 0o777 == (dir_mode if f.is_dir() else file_mode), f.name
