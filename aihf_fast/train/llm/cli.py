"""Command line of the LLM trainer (``python -m aihf_fast.train.llm``, ``aihf-fast train-llm``)."""
from __future__ import annotations

import sys

from ...data.records import DataError
from ..preemption import Interrupted
from .config import ConfigError, parse_args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--synthetic" in argv:
            from .synthetic_job import run

            run(argv)
            return 0
        cfg, _ = parse_args(argv)
        from .trainer import train

        s = train(cfg)
        first, last = (s["evals"][0], s["evals"][-1]) if s["evals"] else ({}, {})
        for key in ("eval/reward", "eval/rm_accuracy", "eval/pref_accuracy", "eval/demo_nll"):
            if key in first and key in last:
                print(f"{key}: {first[key]:.3f} (step {first['step']}) -> {last[key]:.3f} (step {last['step']})")
        return 0
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGTERM / SIGINT: checkpoint written, exit 128 + signal
        if e.rank == 0:
            print(f"[aihf_fast] {e}", file=sys.stderr, flush=True)
        return e.exit_code


def main_then_exit(argv=None) -> int:
    """``main`` for a process that exits next (``python -m``, the console command): afterwards it
    leaves the process group (a barrier only after success), so no rank aborts at exit with
    ``terminate called without an active exception`` (launcher exit code 250). In-process
    callers use ``main``, which keeps the group for the next run."""
    ok = False
    try:
        rc = main(argv)
        ok = rc == 0
        return rc
    finally:
        trainer = sys.modules.get(f"{__package__}.trainer")  # imported only if a run started
        if trainer is not None:
            trainer.shutdown_distributed(barrier=ok)
