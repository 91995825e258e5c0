"""Exploration, not a verdict: AIHF's variants on the known-reward task at a few rates.

What it is for: seeing whether the variants (two step sizes, replay of own samples, the explicit
reward-model + RL loop) run and what range of rates is worth putting into a benchmark's tuning
grid. It is NOT a comparison of methods: one seed, a handful of configurations, no tuning of the
baselines, no selection rule. Its seeds (``--seeds``, default 1000) are exploration seeds; a
benchmark's final results must use other seeds.

Each configuration is ``python -m aihf_fast.train.llm --synthetic`` (design A, 2000 imperfect
demonstrations, 200 preference pairs, the tiny Llama base; ``--steps`` optimiser steps, or RL
steps for aihf_rm, from the base for the implicit forms, from the SFT policy for aihf_rm) with
the flags below; the true reward of samples on the 500 held-out prompts is recorded at every
evaluation (every ``--eval-every`` steps) and at the end. Records are kept per run in the JSON,
so an interrupted run continues where it stopped.

    python benchmarks/explore_aihf_variants.py                   # ~10 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit, cpu_name, versions  # noqa: E402

# (label, trainer flags): the one-rate form at two rates, two step sizes, replay, the explicit loop
GRID = [
    ("aihf, one rate", dict(lr=1e-4)),
    ("aihf, one rate", dict(lr=5e-4)),
    ("aihf, two rates", dict(lr=5e-4, lr_P=5e-5)),
    ("aihf, two rates", dict(lr=5e-4, lr_P=1e-5)),
    ("aihf, replay", dict(lr=5e-4, refresh_every=25, replay_size=2000)),
    ("aihf_rm", dict(method="aihf_rm", lr=1e-4, rm_lr=3e-4)),
    ("aihf_rm", dict(method="aihf_rm", lr=1e-4, rm_lr=1e-3, rm_steps=40)),
]


def _flags(d: dict) -> list:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="1000", help="comma-separated exploration seeds")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--work", default="runs/explore_aihf_variants")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explore_aihf_variants.json"))
    ap.add_argument("--grid", default=None, help="comma-separated indices into GRID (default: all)")
    a = ap.parse_args(argv)
    from aihf_fast.train.llm.synthetic_job import run

    grid = [GRID[int(i)] for i in a.grid.split(",")] if a.grid else GRID
    data = json.load(open(a.out)) if os.path.isfile(a.out) else {"runs": []}
    done = {(r["label"], json.dumps(r["flags"], sort_keys=True), r["seed"]) for r in data["runs"]}
    for seed in (int(s) for s in a.seeds.split(",")):
        for label, flags in grid:
            flags = dict(flags, steps=a.steps, eval_every=a.eval_every)
            if (label, json.dumps(flags, sort_keys=True), seed) in done:
                continue
            t0 = time.time()
            s = run(["--synthetic", "--seed", str(seed), "--output-dir", a.work, "--progress", "false", *_flags(flags)])
            rec = dict(label=label, flags=flags, seed=seed, wall_s=time.time() - t0,
                       evals=[{k: e[k] for k in ("step", "eval/reward", "eval/reward_sem") if k in e} for e in s["evals"]])
            data["runs"].append(rec)
            data.update(benchmark="explore_aihf_variants", device=cpu_name(), versions=versions(), commit=commit(),
                        note="exploration on exploration seeds: not a comparison of methods")
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(data, f, indent=1)
            e0, e1 = rec["evals"][0], rec["evals"][-1]
            print(f"{label:16s} {json.dumps({k: v for k, v in flags.items() if k not in ('steps', 'eval_every')}):60s} "
                  f"seed {seed}: {e0['eval/reward']:.2f} -> {e1['eval/reward']:.2f} "
                  f"(best {max(e['eval/reward'] for e in rec['evals']):.2f}) in {rec['wall_s']:.0f} s", flush=True)
    return data


if __name__ == "__main__":
    main()
