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

Before the first step of a launch (start-up: imports, model loading, a checkpoint being read, the
first evaluation) there is nothing new to save: a signal stops at once with one line and the same
exit code. After the last step (final evaluation, saving the model) a signal is recorded and the
run completes; a job of several runs (``--synthetic``) stops when the next one starts.
"""
from __future__ import annotations

import os
import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_S = 5.0  # a second signal sooner than this after the first is the same stop, not an abort


class Interrupted(BaseException):
    """A run stopped by a signal after ``step`` steps, with a checkpoint to resume from (or during
    start-up: ``step`` and ``checkpoint`` None). A BaseException, as KeyboardInterrupt is, so
    that no ``except Exception`` on the way turns it into another error."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None, rank: int = 0):
        self.signum, self.step, self.checkpoint, self.rank = signum, step, checkpoint, rank
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after step {step}: checkpoint written to {checkpoint}; continue "
                         "with --resume" if checkpoint else
                         f"interrupted by {name} while a run was starting: no step of it was run")

    def __reduce__(self):  # pickled whole (e.g. from a process-pool worker back to its parent)
        return type(self), (self.signum, self.step, self.checkpoint, self.rank)


class StopOnSignal:
    """``with StopOnSignal() as stop:`` the first SIGTERM/SIGINT is recorded (``stop.requested()``),
    a second one aborts at once. Between ``stop.starting()`` and ``stop.in_loop()`` (start-up)
    the first raises ``Interrupted`` right away instead. One instance handles a process's signals:
    a nested ``with StopOnSignal()`` gets the active one (the command line's, around a trainer's).
    Handlers are installed only in the main thread."""

    _active = None

    def __init__(self):
        self.at_once = False
        self.signum = None
        self._old = {}
        self._outer = None

    def __enter__(self):
        if StopOnSignal._active is not None:
            self._outer = StopOnSignal._active
            return self._outer
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
            StopOnSignal._active = self
        return self

    def __exit__(self, *exc):
        if self._outer is not None:
            self._outer = None
            return False
        self._restore()
        return False

    def _restore(self):
        """Put the earlier handlers back, with the two signals blocked meanwhile (one arriving
        then is delivered to the restored handler, never half-way through the restore)."""
        if StopOnSignal._active is self:
            StopOnSignal._active = None
        self.at_once = False
        old, self._old = self._old, {}
        if not old:
            return
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for s, h in old.items():
                signal.signal(s, h)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def starting(self) -> None:
        """Start-up of a run: a signal stops at once (one already recorded, while an earlier run
        of this process was finishing, stops now; under several processes, one recorded by any
        rank: call it at the same point on every rank)."""
        import torch.distributed as dist

        self.at_once = True
        signum = self.signum
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            signum = self.requested(dist.get_world_size(), device)
        if signum is not None:
            self.signum = self.signum or signum
            raise Interrupted(signum)

    def in_loop(self) -> None:
        """The training loop: a signal is recorded, the loop stops at the end of its step."""
        self.at_once = False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self._t = signum, time.monotonic()
            if self.at_once:
                raise Interrupted(signum)
            return
        if time.monotonic() - self._t < GRACE_S:  # the same stop, delivered twice
            return
        self._restore()  # a second signal: the default action, now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, world: int = 1, device=None) -> int | None:
        """The signal received by this process, or under several processes by any of them (every
        rank gets the same answer; call it at the same point on every rank)."""
        import torch
        import torch.distributed as dist

        if world > 1 and dist.is_initialized():
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self.signum


def main_then_exit(main, argv=None) -> int:
    """``main(argv)`` for a process that exits next (``python -m``, console commands): the
    handlers stay installed until it returns, so a stop delivered twice (Ctrl-C plus the
    launcher's SIGTERM) cannot kill the process while it reports and cleans up."""
    with StopOnSignal():
        return main(argv)


def signal_hook(step: int, rank: int = 0) -> None:
    """Test hook: ``AIHF_FAST_SIGNAL_AFTER_STEP=N`` sends SIGTERM to rank 0 itself after step N
    (N = 0: during start-up)."""
    at = os.environ.get("AIHF_FAST_SIGNAL_AFTER_STEP")
    if at is not None and rank == 0 and step == int(at):
        os.kill(os.getpid(), signal.SIGTERM)
