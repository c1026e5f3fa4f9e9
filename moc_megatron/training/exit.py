"""Stopping before --train-iters: --exit-interval, --exit-duration-in-mins, --exit-signal-handler.

    exits = Exits(cfg, started)           # installs the --exit-signal handler (main thread only)
    reason = exits.check(iteration, dev)  # at a step boundary, on every rank: why to stop, or None
    exits.close()                         # the previous handler again

The ranks agree with ONE all-reduce (MAX) of their local flags, so a signal that reached only some
ranks, or a clock past the limit on one, stops all of them after the same step. Without
--exit-duration-in-mins and --exit-signal-handler there is no collective: --exit-interval is the same
on every rank. The handler only sets a flag; the step in flight finishes first.
--exit-duration-in-mins counts from the start of train() in this process, before the model is built and
the checkpoint loaded: each job of a requeued run has the whole duration again.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from moc_megatron.errors import UserError


class Exits:
    def __init__(self, cfg, started: float | None = None):
        t = cfg.training
        self.interval, self.minutes = t.exit_interval, t.exit_duration_in_mins
        self.started = time.monotonic() if started is None else started  # this process's start, see train()
        self.signum = signal.Signals[t.exit_signal] if t.exit_signal_handler else None
        self.received = False
        self._installed, self._previous = False, None
        if self.signum is not None:
            if threading.current_thread() is not threading.main_thread():
                raise UserError("--exit-signal-handler: the trainer must run in the main thread to receive signals")
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # async-signal-safe: a flag, read at the next step boundary

    @property
    def needs_agreement(self) -> bool:
        return self.signum is not None or self.minutes is not None

    def check(self, iteration: int, device) -> str | None:
        """Why every rank stops after step ``iteration`` (the same text everywhere), or None to go on."""
        elapsed = (time.monotonic() - self.started) / 60
        flags = [self.received, self.minutes is not None and elapsed >= self.minutes,
                 bool(self.interval) and iteration % self.interval == 0]
        if self.needs_agreement and dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor(flags, dtype=torch.int32, device=device)  # NCCL needs the model's device
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = [bool(x) for x in agreed.tolist()]
        if flags[0]:
            return f"{self.signum.name} received (--exit-signal-handler)"
        if flags[1]:
            return f"--exit-duration-in-mins {self.minutes:g} reached since the trainer started"
        if flags[2]:
            return f"--exit-interval {self.interval}"
        return None

    def close(self) -> None:
        if self._installed:
            signal.signal(self.signum, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
