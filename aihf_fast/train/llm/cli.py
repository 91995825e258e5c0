"""Command line of the LLM trainer (``python -m aihf_fast.train.llm``, ``aihf-fast train-llm``).

A failure the user can fix (an option, a data file, a model or tokenizer that cannot load, a
damaged checkpoint, a run that diverged) is one line on stderr and exit code 2 (``--debug``: the traceback); a signal
is one line and exit code 128 + signal (``aihf_fast.train.preemption``). Final messages come
from rank 0 only."""
from __future__ import annotations

import atexit
import os
import sys

from ...data.records import DataError
from ..preemption import Interrupted, StopOnSignal
from .config import ConfigError, parse_args


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _run(argv) -> int:
    if "--synthetic" in argv:
        from .synthetic_job import run

        run(argv)
        return 0
    cfg, _ = parse_args(argv)
    from .trainer import train

    s = train(cfg)
    if _rank() == 0:
        first, last = (s["evals"][0], s["evals"][-1]) if s["evals"] else ({}, {})
        for key in ("eval/reward", "eval/rm_accuracy", "eval/pref_accuracy", "eval/demo_nll"):
            if key in first and key in last:
                print(f"{key}: {first[key]:.3f} (step {first['step']}) -> {last[key]:.3f} (step {last['step']})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with StopOnSignal() as stop:  # until a run's loop starts, a signal stops at once
            stop.starting()
            return _run(argv)
    except (ConfigError, DataError, FloatingPointError) as e:  # FloatingPointError: the run diverged
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGTERM / SIGINT: checkpoint written (or start-up cut short), exit 128 + signal
        if e.rank == 0 and _rank() == 0:
            print(f"[aihf_fast] {e}", file=sys.stderr, flush=True)
        return e.exit_code


def main_then_exit(argv=None) -> int:
    """``main`` for a process that exits next (``python -m``, the console command). Afterwards it
    leaves the process group (a barrier only after success) and, if the run had several processes
    and returned, runs the ``atexit`` handlers, flushes the streams and ends the process with
    ``os._exit``: the native teardown that follows otherwise can abort a rank (``terminate called
    without an active exception``, launcher exit code 250) after all its outputs are written. An
    exception takes the normal exit, traceback first. In-process callers use ``main``, which keeps
    the group for the next run."""
    with StopOnSignal():  # handled until the process exits (see preemption.main_then_exit)
        ok, rc = False, 1
        try:
            rc = main(argv)
            ok = rc == 0
        finally:
            trainer = sys.modules.get(f"{__package__}.trainer")  # imported only if a run started
            if trainer is not None:
                trainer.shutdown_distributed(barrier=ok)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by the launcher
            atexit._run_exitfuncs()  # e.g. experiment trackers that close their runs at exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return rc
