"""What the end of an episode should be worth under a learned reward: the control trainer's
``--termination`` (env | absorbing | horizon) and ``--rl-reward`` (sigmoid | raw), measured on the
tasks whose episodes end early, before the round-two control protocol fixes them.

    python benchmarks/bench_termination.py --profile small     # Hopper + Walker2d, 2 design seeds (2-core CPU)

Protocol (fixed before any result was seen; profiles change sizes only)
---------------------------------------------------------------------
Seeds 100 and 101: design seeds, never used by round two's tuning or final results. Tasks
Hopper-v5 and Walker2d-v5 (the round-two tasks whose episodes end when the body falls;
HalfCheetah never ends early; Ant, the fourth, is left to a machine with more cores).
Per task and seed:
- expert: PPO on the true reward, the task's terminations, ``steps`` env steps, snapshots; data as
  round one: 10 demonstration episodes from the snapshot at 0.7 of the way from random to the best,
  ``pairs`` + 50 held-out segment pairs (50 steps, Bradley-Terry labels, temperature 1).
- the true-reward pipeline: PPO on the true reward with ``--termination horizon`` (training
  episodes always run to the time limit), against the expert run itself (``env``), same steps.
- the learned-reward pipeline, ``steps`` env steps each, trainer defaults otherwise:
    irl   sigmoid+env (round one), raw+env, raw+absorbing, raw+horizon
    rlhf  sigmoid+env, raw+env, raw+horizon (absorbing needs the demonstration term), on ``pairs``
          pairs, reward fit early-stopped on the 50 held-out pairs
Reported per run: the true return of the deterministic policy (mean of the last 3 evaluations,
10 episodes each, the task's own terminations), normalised as (return - random) / (demonstrations
- random); the episode length; the learned reward's correlation with the true one on the
policy's batches (mean of the last 10 PPO iterations).
Rule for round two (fixed here): a treatment is admissible if, with the true reward, it keeps
>= 90% of ``env``'s normalised return (mean over tasks and seeds; ``absorbing`` with the true
reward is ``env``). Each method gets the admissible treatment of its own candidates with the
highest mean normalised return over tasks and seeds (aihf takes irl's: the same demonstration
term); this reads the true reward, on design seeds only, as choosing PPO's settings would. Paired
differences against ``sigmoid+env`` are reported with 95% intervals (2 seeds x 2 tasks: wide).
Outputs: benchmarks/results/bench_termination_<profile>.json + .png (device, versions, commit).
Amendment (made before any learned-reward run of this benchmark had finished; none was seen): a
review found the first ``absorbing`` implementation faulty (r_abs a lone scalar that Adam moved at
most lr per step; the policy's absorbing share read from single batches, biased by the restarts
after evaluations), and rlhf's reward normaliser fitted on demonstrations; the learned-reward runs
use the corrected trainer (commit 353528e on), the expert and true-reward runs made before are kept
(their code did not change).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ci95, commit, cpu_name, grid_arguments, run_jobs, save_grid_result, versions  # noqa: E402

PROFILES = {
    "tiny": dict(tasks=["Hopper-v5"], seeds=[100], steps=2 * 8 * 32, pairs=8, heldout=4, num_envs=8,
                 rollout_steps=32, pool_episodes=2, segment_len=10, eval_episodes=2, eval_every=32, workers=1,
                 rlhf_reward_steps=20),
    "small": dict(tasks=["Hopper-v5", "Walker2d-v5"], seeds=[100, 101], steps=1_000_000, pairs=200, heldout=50,
                  num_envs=16, rollout_steps=128, pool_episodes=8, segment_len=50, eval_episodes=10, eval_every=10,
                  workers=2, rlhf_reward_steps=2000),
}
TREATMENTS = {"irl": ("sigmoid+env", "raw+env", "raw+absorbing", "raw+horizon"),
              "rlhf": ("sigmoid+env", "raw+env", "raw+horizon")}
BASELINE = "sigmoid+env"


def plan(prof):
    jobs = []
    for task in prof["tasks"]:
        for s in prof["seeds"]:
            e, d = f"expert-{task}-s{s}", f"data-{task}-s{s}"
            jobs.append(dict(kind="expert", key=e, deps=[], task=task, seed=s, cost=100))
            jobs.append(dict(kind="data", key=d, deps=[e], task=task, seed=s, cost=50))
            jobs.append(dict(kind="run", key=f"true-horizon-{task}-s{s}", deps=[], task=task, seed=s, method="expert",
                             treatment="true+horizon", cost=10))
            for m, ts in TREATMENTS.items():
                for t in ts:
                    jobs.append(dict(kind="run", key=f"{m}-{t}-{task}-s{s}", deps=[d], task=task, seed=s, method=m,
                                     treatment=t, cost=10))
    return jobs


def _init_worker(threads):
    import torch

    torch.set_num_threads(threads)


def _final(evals, key="eval/return"):
    return float(np.mean([e[key] for e in evals[-3:]]))


def run_job(job, prof, work):
    from aihf_fast.train.control.config import ControlConfig
    from aihf_fast.train.control.datagen import make_data
    from aihf_fast.train.control.trainer import train

    task, s = job["task"], job["seed"]
    root = os.path.join(work, f"{task}-s{s}")
    common = dict(task=task, seed=s, num_envs=prof["num_envs"], rollout_steps=prof["rollout_steps"],
                  eval_episodes=prof["eval_episodes"], eval_every=prof["eval_every"], progress=False, overwrite=True,
                  sim_threads=1, env_steps=prof["steps"])
    if job["kind"] == "expert":
        summ = train(ControlConfig(method="expert", save_every=prof["eval_every"],
                                   output_dir=os.path.join(root, "expert"), **common))
        return dict(kind="expert", task=task, seed=s, evals=summ["evals"], final=_final(summ["evals"]),
                    length=_final(summ["evals"], "eval/length"), sim_seconds=summ["sim_seconds"],
                    learn_seconds=summ["learn_seconds"], env_steps=summ["env_steps"])
    if job["kind"] == "data":
        meta = make_data(os.path.join(root, "expert"), os.path.join(root, "data"), num_demos=10, demo_quality=0.7,
                         num_pairs=prof["pairs"] + prof["heldout"], segment_len=prof["segment_len"],
                         pool_episodes=prof["pool_episodes"], seed=s)
        return dict(kind="data", task=task, seed=s, meta=meta)
    out = os.path.join(work, "runs", job["key"])
    m = job["method"]
    rl_reward, termination = job["treatment"].split("+")
    kw = {}
    if m in ("irl", "rlhf"):
        kw.update(rl_reward=rl_reward, demonstrations=os.path.join(root, "data", "demos.npz") if m == "irl" else None)
    if m == "rlhf":
        kw.update(preferences=os.path.join(root, "data", "prefs.npz"), num_pairs=prof["pairs"],
                  heldout_pairs=prof["heldout"], rlhf_reward_steps=prof["rlhf_reward_steps"])
    summ = train(ControlConfig(method=m, termination=termination, output_dir=out, **common, **kw))
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        corr = [r["reward/corr_true"] for r in map(json.loads, f) if r.get("reward/corr_true") is not None]
    shutil.rmtree(out, ignore_errors=True)
    return dict(kind="run", key=job["key"], task=task, seed=s, method=m, treatment=job["treatment"], evals=summ["evals"],
                final=_final(summ["evals"]), length=_final(summ["evals"], "eval/length"),
                corr_last10=float(np.mean(corr[-10:])) if corr else None, sim_seconds=summ["sim_seconds"],
                learn_seconds=summ["learn_seconds"], env_steps=summ["env_steps"])


def analyse(records, prof):
    data = {(r["task"], r["seed"]): r["meta"] for r in records.values() if r.get("kind") == "data"}
    runs = [r for r in records.values() if r.get("kind") == "run"]
    for r in records.values():  # the expert run is the true-reward pipeline under "env"
        if r.get("kind") == "expert":
            runs.append(dict(r, method="expert", treatment="true+env"))

    def norm(r):
        m = data[(r["task"], r["seed"])]
        return (r["final"] - m["random_return"]) / (m["demo_mean_return"] - m["random_return"])

    cells = {}
    for r in runs:
        cells.setdefault((r["method"], r["treatment"]), {})[(r["task"], r["seed"])] = r
    table = []
    for (m, t), per in sorted(cells.items()):
        keys = sorted(per)
        v = [norm(per[k]) for k in keys]
        base = cells.get((m, "true+env" if m == "expert" else BASELINE), {})
        paired = [norm(per[k]) - norm(base[k]) for k in keys if k in base]
        table.append(dict(method=m, treatment=t, runs=[f"{k[0]}/s{k[1]}" for k in keys],
                          returns=[per[k]["final"] for k in keys], normalised=v, mean_normalised=float(np.mean(v)),
                          ci95=ci95(v), length=[per[k]["length"] for k in keys],
                          corr_last10=[per[k].get("corr_last10") for k in keys],
                          diff_vs_baseline=float(np.mean(paired)) if paired else None,
                          diff_ci95=ci95(paired) if paired else None))
    by = {(r["method"], r["treatment"]): r for r in table}
    env_true, hor_true = by.get(("expert", "true+env")), by.get(("expert", "true+horizon"))
    admissible = {"env": True, "absorbing": True,
                  "horizon": bool(env_true and hor_true and hor_true["mean_normalised"] >= 0.9 * env_true["mean_normalised"])}
    choice = {}
    for m, ts in TREATMENTS.items():
        ok = [t for t in ts if admissible[t.split("+")[1]] and (m, t) in by]
        if ok:
            choice[m] = max(ok, key=lambda t: by[(m, t)]["mean_normalised"])
    if "irl" in choice:
        choice["aihf"] = choice["irl"]
    refs = {task: {k: float(np.mean([data[x][k] for x in data if x[0] == task])) for k in
                   ("random_return", "demo_mean_return", "expert_best_return")} for task in prof["tasks"]
            if any(x[0] == task for x in data)}
    steps = sum(r["env_steps"] for r in runs)
    wall = dict(sim_seconds_per_100k=1e5 * sum(r["sim_seconds"] for r in runs) / steps if steps else None,
                learn_seconds_per_100k=1e5 * sum(r["learn_seconds"] for r in runs) / steps if steps else None)
    return dict(table=table, admissible=admissible, choice=choice, references=refs, wall_clock=wall)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["analysis"]["table"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r['method']}\n{r['treatment']}" for r in table]
    x = np.arange(len(table))
    for ax, key, ylabel in ((axes[0], "normalised", "(return - random) / (demos - random)"),
                            (axes[1], "length", "episode length (evaluation)")):
        ax.bar(x, [np.mean(r[key]) for r in table], color="lightgray")
        for i, r in enumerate(table):
            ax.scatter([i] * len(r[key]), r[key], s=12, color="k", zorder=3)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(ylabel)
    axes[0].axhline(1.0, color="k", ls="--", lw=0.8, label="demonstrations")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['device']} commit {str(result['commit'])[:10]}; choice {result['analysis']['choice']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = grid_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), PROFILES, "small")
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args(argv)
    prof = PROFILES[a.profile]
    work = a.work or str(ROOT / "runs" / f"bench_termination_{a.profile}")
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_termination_{a.profile}.json")
    if a.fresh:
        shutil.rmtree(work, ignore_errors=True)
    head, t0 = commit(), time.time()
    records = run_jobs(plan(prof), run_job, (prof, work), os.path.join(work, "records"), a.workers or prof["workers"],
                       _init_worker, (a.threads,))
    analysis = analyse(records, prof)
    result = dict(benchmark="bench_termination", profile=a.profile, profile_config=prof, device=cpu_name(),
                  versions=versions("mujoco", "gymnasium"), commit=head, wall_seconds_this_invocation=time.time() - t0,
                  command="python benchmarks/bench_termination.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  analysis=analysis, records=list(records.values()))
    save_grid_result(result, out, plot)
    for r in analysis["table"]:
        d = "" if r["diff_vs_baseline"] is None else f"  diff {r['diff_vs_baseline']:+.2f} +- {r['diff_ci95']:.2f}"
        print(f"{r['method']:<7} {r['treatment']:<14} normalised {r['mean_normalised']:6.2f} +- {r['ci95']:.2f}  "
              f"length {np.mean(r['length']):6.0f}{d}")
    print(f"admissible: {analysis['admissible']}  choice: {analysis['choice']}")
    print(f"[bench] wrote {out}")
    return result


if __name__ == "__main__":
    main()
