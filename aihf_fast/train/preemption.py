"""Preemption for long jobs: SIGTERM / SIGINT finish the current step, write a checkpoint, stop.

A scheduler's preemption or ``scancel`` (SIGTERM) or Ctrl-C (SIGINT) sets a flag; the training
loop checks it after every step (under several processes all of them agree, so every rank stops
after the same step, even when only one was signalled), writes a checkpoint unless that step
just wrote one, and raises ``Interrupted``. The command lines turn it into a one-line message
and exit code ``128 + signal`` (143 for SIGTERM, 130 for SIGINT); ``--resume`` continues
exactly. A second signal at least ``GRACE_S`` seconds after the first aborts at once (one
sooner is the same stop arriving twice: Ctrl-C reaches every rank and DeepSpeed's per-node
launcher then sends each a SIGTERM too). Signal the whole process group, as Slurm and Ctrl-C
do: the single-node ``deepspeed`` runner does not forward a signal sent to it alone, and the
per-node launcher kills the ranks 30 s after forwarding one.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_S = 5.0  # a second signal sooner than this after the first is the same stop, not an abort


class Interrupted(Exception):
    """A run stopped by a signal after ``step`` steps, with a checkpoint to resume from."""

    def __init__(self, signum: int, step: int, checkpoint: str, rank: int = 0):
        self.signum, self.step, self.checkpoint, self.rank = signum, step, checkpoint, rank
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}: checkpoint written to "
                         f"{checkpoint}; continue with --resume")


class StopOnSignal:
    """``with StopOnSignal() as stop:`` the first SIGTERM/SIGINT is recorded (``stop.requested()``),
    a second one aborts at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self._t = signum, time.monotonic()
            return
        if time.monotonic() - self._t < GRACE_S:  # the same stop, delivered twice
            return
        self.__exit__()  # a second signal: the default action, now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, world: int = 1, device=None) -> int | None:
        """The signal received by this process, or under several processes by any of them (every
        rank gets the same answer; call it at the same point on every rank)."""
        if world > 1 and dist.is_initialized():
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self.signum


def signal_hook(step: int, rank: int = 0) -> None:
    """Test hook: ``AIHF_FAST_SIGNAL_AFTER_STEP=N`` sends SIGTERM to rank 0 itself after step N."""
    at = os.environ.get("AIHF_FAST_SIGNAL_AFTER_STEP")
    if at is not None and rank == 0 and step == int(at):
        os.kill(os.getpid(), signal.SIGTERM)
