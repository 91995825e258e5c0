"""Learner speed of the control trainer: seconds of learning and of simulation per 100k env steps
(the trainer's own ``learn_seconds`` / ``sim_seconds``), this checkout against another commit
(``--against REF``) in one run, as ratios.

    python benchmarks/bench_control_learner.py --against <commit>

Protocol (fixed before the first run): tasks Hopper-v5 and HalfCheetah-v5; methods ``expert``
(PPO on the true reward: the PPO update alone) and ``aihf`` (PPO + 5 reward steps per iteration
+ the learned reward on every batch); the trainer's defaults otherwise (16 envs x 128 steps per
iteration, 10 epochs of 256-transition minibatches, reward batches of 256 state-actions and 64
segment pairs), ``--env-steps`` 102400 (50 iterations), one evaluation at the end. Data (only
their shapes matter for speed): 10 demonstration episodes and 200 pairs of 50-step segments from
uniformly random actions, in the task with ``terminate_when_unhealthy=False`` so that episodes
are long enough for segments. Learning = what the trainer counts as ``learn_seconds``: reward
steps, the learned reward on the batch, the PPO update (not the rollouts, evaluations or
checkpoints). Each (tree, task, method) runs in its own process; trees alternate for ``--rounds``
rounds; each keeps its fastest learning time. The other tree is a ``git worktree`` of REF with
this checkout's compiled extension copied in (the C++ simulator must be the same); "this" is the
installed package (``pip install .`` of this checkout). Compare on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_result, commit, print_result, versions, write_report  # noqa: E402

TASKS = ("Hopper-v5", "HalfCheetah-v5")
METHODS = ("expert", "aihf")


def make_data(task: str, out: str, seed: int = 0) -> tuple[str, str]:
    """demos.npz (10 episodes) and prefs.npz (200 pairs of 50-step segments) of random actions."""
    import numpy as np

    from aihf_fast.envs import make_vec
    from aihf_fast.train.control.data import first_episodes, sample_segment_pairs

    envs = make_vec(task, num_envs=10, num_threads=2, terminate_when_unhealthy=False) if task == "Hopper-v5" \
        else make_vec(task, num_envs=10, num_threads=2)
    try:
        episodes = first_episodes(envs, None, 10, 1000, seed)
    finally:
        envs.close()
    demos, prefs = os.path.join(out, "demos.npz"), os.path.join(out, "prefs.npz")
    episodes.save(demos)
    sample_segment_pairs([episodes], 200, 50, np.random.default_rng(seed)).save(prefs)
    return demos, prefs


def run_one(task: str, method: str, data: str, env_steps: int, out: str) -> dict:
    """One trainer run in this process -> its learn/sim seconds per 100k env steps."""
    from aihf_fast.train.control.cli import main as control_main

    argv = ["--task", task, "--method", method, "--env-steps", str(env_steps), "--output-dir", out,
            "--eval-every", "1000000", "--save-every", "1000000", "--progress", "false", "--overwrite", "true",
            "--eval-episodes", "2"]
    if method != "expert":
        argv += ["--demonstrations", os.path.join(data, "demos.npz"), "--preferences", os.path.join(data, "prefs.npz")]
    t0 = time.time()
    rc = control_main(argv)
    if rc != 0:
        raise RuntimeError(f"control trainer exited {rc}")
    summ = json.loads(Path(out, "summary.json").read_text())
    steps = summ["env_steps"]
    return dict(task=task, method=method, env_steps=steps, learn_s_per_100k=1e5 * summ["learn_seconds"] / steps,
                sim_s_per_100k=1e5 * summ["sim_seconds"] / steps, wall_s=time.time() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default=None, help="a git ref to compare with (a worktree of it is made)")
    ap.add_argument("--env-steps", type=int, default=102400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)  # task method data
    a = ap.parse_args(argv)
    if a._child:
        task, method, data = a._child
        with tempfile.TemporaryDirectory() as tmp:
            row = run_one(task, method, data, a.env_steps, tmp)
        print_result(row)
        return row
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_control_learner_"))
    trees = {"this": (ROOT, commit())}
    if a.against:
        other = work / "against"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), a.against], check=True,
                       capture_output=True)
        import aihf_fast

        for so in Path(aihf_fast.__file__).parent.glob("_C*.so"):  # the same simulator in both trees
            shutil.copy(so, other / "aihf_fast" / so.name)
        sha = subprocess.run(["git", "-C", str(other), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        trees["against"] = (other, sha.strip())
    rows = []
    try:
        data = {}
        for task in a.tasks.split(","):
            d = work / task
            d.mkdir()
            make_data(task, str(d))
            data[task] = str(d)
        for _ in range(a.rounds):
            for task in a.tasks.split(","):
                for method in a.methods.split(","):
                    for name, (tree, _sha) in trees.items():
                        # this: the installed aihf_fast (pip install . of this checkout); against: the worktree
                        env = dict(os.environ, PYTHONSAFEPATH="1")
                        if name == "against":
                            env["PYTHONPATH"] = str(tree)
                        cmd = [sys.executable, str(Path(__file__)), "--env-steps", str(a.env_steps), "--_child", task,
                               method, data[task]]
                        row, err = child_result(cmd, env=env, cwd=str(work))
                        if row is None:
                            raise RuntimeError(f"{name} {task} {method} failed:\n{err[-2000:]}")
                        row = dict(row, tree=name)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    finally:
        if a.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "against")],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    best = {}
    for r in rows:
        k = (r["tree"], r["task"], r["method"])
        if k not in best or r["learn_s_per_100k"] < best[k]["learn_s_per_100k"]:
            best[k] = r
    summary = []
    for task in a.tasks.split(","):
        for method in a.methods.split(","):
            this = best[("this", task, method)]
            s = dict(task=task, method=method, learn_s_per_100k=this["learn_s_per_100k"],
                     sim_s_per_100k=this["sim_s_per_100k"])
            if a.against:
                other = best[("against", task, method)]
                s.update(against_learn_s_per_100k=other["learn_s_per_100k"],
                         against_sim_s_per_100k=other["sim_s_per_100k"],
                         learn_speedup=other["learn_s_per_100k"] / this["learn_s_per_100k"])
            summary.append(s)
            print(json.dumps(s), flush=True)
    report = dict(benchmark="bench_control_learner", device=f"cpu ({os.cpu_count()} cores, {platform.machine()})",
                  commit=trees["this"][1], against=trees.get("against", (None, None))[1], env_steps=a.env_steps,
                  rounds=a.rounds, versions=versions(), wall_s=round(time.time() - t_start, 1), results=rows,
                  summary=summary)
    out = a.out or str(ROOT / "benchmarks" / "results" / "bench_control_learner_cpu.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
