"""Run a function on N gloo ranks and collect what each returns.

    results = run_ranks(fn, world_size=2, args=(cfg,))   # results[r] is fn's return value on rank r

``fn(rank, world_size, *args)`` runs after ``torch.distributed`` is initialised (gloo, a free loopback
port). If any rank raises, the others are killed at once and the failing rank's traceback is raised
here; if the ranks do not all finish within ``timeout`` seconds, they are killed and a TimeoutError
names the ranks that were still running. A test never hangs CI.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moc_megatron.parallel.net import free_port


class RankFailed(RuntimeError):
    pass


def _entry(fn, rank, world_size, port, outdir, args, env):
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# imported once by the fork server that starts every rank (on CPU machines): each rank would otherwise
# spend seconds importing megatron-core and DeepSpeed again. Only third-party modules, so that the
# ranks see this checkout's files as they are when the rank starts.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "megatron.core.parallel_state", "megatron.core.tensor_parallel"]
_context = None


def _mp_context():
    """forkserver with PRELOAD where no GPU is visible; spawn where one is (a fork server that touched the
    driver while importing would hand its children a CUDA state they cannot use)."""
    global _context
    if _context is None:
        if torch.cuda.is_available():
            _context = mp.get_context("spawn")
        else:
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
    return _context


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 300.0, env: dict | None = None):
    ctx = _mp_context()
    env = {**os.environ, **(env or {})}  # the fork server's environment is the one it started with
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moc-ranks-") as outdir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, outdir, args, env),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            _wait(procs, outdir, deadline, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def _wait(procs, outdir, deadline, timeout):
    while True:
        failed = [rank for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            time.sleep(0.5)  # let the other ranks' tracebacks land, then report the first one written:
            rank = _first_failure(failed, len(procs), outdir)  # a peer's broken collective is a consequence
            err = os.path.join(outdir, f"rank{rank}.err")
            detail = open(err).read() if os.path.exists(err) else f"exit code {procs[rank].exitcode}, no traceback"
            raise RankFailed(f"rank {rank} of {len(procs)} failed:\n{detail}")
        if all(p.exitcode == 0 for p in procs):
            return
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            raise TimeoutError(f"ranks {alive} still running after {timeout:.0f}s; killed")
        time.sleep(0.05)


def _first_failure(failed: list[int], world_size: int, outdir: str) -> int:
    """The failed rank whose traceback was written first (ranks without one come last)."""
    def written(rank):
        err = os.path.join(outdir, f"rank{rank}.err")
        return os.path.getmtime(err) if os.path.exists(err) else float("inf")

    candidates = [r for r in range(world_size) if os.path.exists(os.path.join(outdir, f"rank{r}.err"))]
    return min(candidates or failed, key=lambda r: (written(r), r))
