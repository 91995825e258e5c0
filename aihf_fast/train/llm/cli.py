"""Command line of the LLM trainer (``python -m aihf_fast.train.llm``, ``aihf-fast train-llm``)."""
from __future__ import annotations

import sys

from ...data.records import DataError
from .config import ConfigError, parse_args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ok = False
    try:
        if "--synthetic" in argv:
            from .synthetic_job import run

            run(argv)
        else:
            cfg, _ = parse_args(argv)
            from .trainer import train

            s = train(cfg)
            if s["evals"]:
                print(f"eval reward: {s['evals'][0]['eval/reward']:.3f} (step {s['evals'][0]['step']}) -> "
                      f"{s['evals'][-1]['eval/reward']:.3f} (step {s['evals'][-1]['step']})")
        ok = True
        return 0
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        trainer = sys.modules.get(f"{__package__}.trainer")  # imported only if a run started
        if trainer is not None:
            trainer.shutdown_distributed(barrier=ok)
