"""``python -m aihf_fast.train.control [--config F] [--flags]`` trains one method (``--method
expert|bc|irl|rlhf|aihf``); ``python -m aihf_fast.train.control data --expert-dir D --out-dir O``
draws demonstrations and preferences from an expert run.

A failure the user can fix (bad config, missing or malformed data files, a missing expert run)
is one line on stderr and exit code 2 (``--debug``: the traceback); a signal is one line and exit
code 128 + signal (``aihf_fast.train.preemption``)."""
from __future__ import annotations

import argparse
import os
import sys

from ..options import ConfigError, build_parser, parse_args
from ..preemption import Interrupted, StopOnSignal
from .config import ControlConfig
from .data import ControlDataError

DESCRIPTION = ("Train a MuJoCo policy with one method (--method expert|bc|irl|rlhf|aihf) on the batched C++ envs. "
               "Subcommand `data --expert-dir D --out-dir O` draws demonstrations and segment preferences from an "
               "expert run (`data --help`).")


def _data_main(argv) -> int:
    from .datagen import make_data

    p = argparse.ArgumentParser(prog="python -m aihf_fast.train.control data",
                                description="demonstrations + segment preferences from an expert run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--expert-dir", required=True, help="output_dir of a --method expert run")
    p.add_argument("--out-dir", required=True, help="where demos.npz, prefs.npz and data.json go")
    p.add_argument("--num-demos", type=int, default=10, help="demonstration episodes")
    p.add_argument("--demo-quality", type=float, default=0.7, help="snapshot return ~ random + q (best - random)")
    p.add_argument("--action-noise", type=float, default=0.0, help="std of Gaussian action noise in the demonstrations")
    p.add_argument("--num-pairs", type=int, default=1000, help="preference pairs (nested: a budget is a prefix)")
    p.add_argument("--segment-len", type=int, default=50, help="steps per compared segment")
    p.add_argument("--temperature", type=float, default=1.0, help="Bradley-Terry temperature (0: argmax)")
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of preference labels flipped")
    p.add_argument("--pool-episodes", type=int, default=8, help="episodes per policy in the preference pool")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes and labels")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback, not one line")
    a = vars(p.parse_args(argv))
    a.pop("debug")
    expert_dir = a.pop("expert_dir")
    if not os.path.isfile(os.path.join(expert_dir, "config.json")):
        raise ConfigError(f"expert_dir {expert_dir!r}: no config.json there (train one with --method expert "
                          "--output-dir DIR first)")
    meta = make_data(expert_dir, a.pop("out_dir"), **a)
    print({k: meta[k] for k in ("expert_best_return", "random_return", "demo_mean_return", "num_pairs", "label_agreement")})
    return 0


def _run(argv) -> int:
    if argv[:1] == ["data"]:
        return _data_main(argv[1:])
    from .trainer import train

    parser = build_parser(ControlConfig, "python -m aihf_fast.train.control", DESCRIPTION)
    cfg, _ = parse_args(ControlConfig, parser, argv)
    s = train(cfg)
    print(f"[control] {cfg.method} on {cfg.task}: true return {s['final_return']:.1f} after {s['env_steps']} env "
          f"steps (simulation {s['sim_seconds']:.1f}s, learning {s['learn_seconds']:.1f}s); {cfg.output_dir}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with StopOnSignal() as stop:  # until the training loop starts, a signal stops at once
            stop.starting()
            return _run(argv)
    except (ConfigError, ControlDataError, FloatingPointError) as e:  # FloatingPointError: a diverged update
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGTERM / SIGINT: checkpoint written, exit 128 + signal
        print(f"[aihf_fast] {e}", file=sys.stderr, flush=True)
        return e.exit_code
