"""The paper's control claim, round two: AIHF against RLHF, IRL and BC on MuJoCo with 1M-step RL,
every method tuned the same way, started the same way, and the end of an episode handled as
measured (``bench_termination.py``). Every run is ``aihf_fast.train.control``.

    python benchmarks/bench_control_round2.py --profile full --tasks Hopper-v5      # one task's slice
    python benchmarks/bench_control_round2.py --profile full --analyse-only         # tables from the records
    python benchmarks/bench_control_round2.py --profile full --records-from \
        benchmarks/results/bench_control_round2_full.json --analyse-only            # on a machine without runs/

Protocol (fixed before any result was seen; profiles change sizes only)
---------------------------------------------------------------------
Tasks Hopper-v5, HalfCheetah-v5, Walker2d-v5, Ant-v5. Tuning seeds 200, 201; final seeds 10-14
(fresh: no tuning, design or round-one run used them); seeds are paired (same expert, data,
evaluation resets).
Data per task and seed: an expert by PPO on the true reward (1M env steps, snapshots every 10
iterations); 12 demonstration episodes from the snapshot at 0.7 of the way from random to the best
(the last 2 held out: ``heldout_demos``); 1100 pairs of 50-step segments from every snapshot plus
a random policy, Bradley-Terry labels (temperature 1), the last 100 held out (``heldout_pairs``),
nested budgets {10, 50, 200, 1000}; a low-quality arm, the same draw with 20% of the labels
flipped (held-out pairs included).
Methods, 1M env steps of the same PPO (trainer defaults) each: bc; irl (budget 0); rlhf and aihf
(w_D = w_P = 1) at every non-zero budget. Start: every RL method's actor starts from BC on the
training demonstrations (2000 steps; as SFT starts RLHF) in the primary comparison; from scratch in
a secondary one (irl, and rlhf/aihf at 10 pairs). End of an episode: each method's treatment
(``--termination``, ``--rl-reward``) as chosen by bench_termination's rule (read from
benchmarks/results/bench_termination_small.json; aihf takes irl's).
Equal tuning: 4 configurations per method, on the tuning seeds, at 50 pairs (irl and bc: no pairs),
primary start, clean labels:
    irl, aihf   reward_lr {3e-4, 1e-4} x reward_steps per PPO iteration {5, 1}
    rlhf        reward_lr {3e-4, 1e-4} x reward_l2 {1e-3, 1e-2} (its reward fit is before RL,
                early-stopped on the held-out pairs)
    bc          bc_steps {1000, 2000, 5000, 10000}
Selection (never reads the true reward; one rule per kind, fixed here): bc by the held-out
demonstrations' NLL under the final policy (lower is better); irl, rlhf, aihf by the learned
reward's accuracy on the held-out pairs at the last evaluation (higher is better; ties by the
held-out pair NLL; irl sees these pairs only here). The configuration with the best mean over the
2 tuning seeds is used for every budget, arm and start of that task and method. (Clarified post hoc,
no choice changed: means are compared to 6 decimals, so that equal pair counts tie in float32; a
tie left after that goes to the lowest configuration number.)
Reported per run: the true return of the deterministic policy, mean of the last 3 evaluations
(10 episodes each; the last checkpoint, no checkpoint selection), the episode length, corr(r_theta,
true reward) on the policy's own PPO batches (mean of the last 10 iterations, and the curve),
held-out pair accuracy, wall-clock split (simulation, learning).
Verdict (the goal): per task and budget, aihf - rlhf paired over the 5 final seeds with a 95%
t-interval: aihf >= rlhf within paired noise (the interval's upper end >= 0) at every budget and
task, and aihf >= 1.2 x rlhf at 10 pairs (with the gain over random also given); aihf >= bc and
>= irl by the same paired test. The low-quality arm and the from-scratch start are reported the
same way, as secondary results.
Amendment (post hoc: written after a HalfCheetah rlhf run diverged, rlhf's HalfCheetah results at
10-200 pairs seen, before any aihf or bc final run on HalfCheetah or any final run on Walker2d or Ant):
a run whose PPO update diverges (the policy's parameters or the update's inputs turn non-finite;
the trainer stops with an error) is kept as a record marked ``diverged`` (``iteration``: the last
iteration completed before it; times and env steps: those of the completed iterations), scored by
the same rule on the evaluations made before the divergence (the last policy a user would have);
each paired difference of a verdict row that includes such a seed (aihf against rlhf, bc or irl)
is also given without it. A diverged tuning run gives its configuration the worst selection
signal.
Amendment 2 (post hoc: written after Ant's tuning runs were made, 7 of their 24 RL runs diverged,
before any Ant final run): the divergences traced to the rollout policy, which dropped training's
clamp of the normalised observation to [-10, 10]; on observations beyond it (Ant's contact forces,
whose running std is tiny) the rollouts drew actions far from the mean the update trains (log-
probabilities down to -190 under the trained policy) and the probability ratio overflowed. The
trainer now applies the clamp in the rollouts too (``MLPPolicy`` observation bounds). Ant is made
whole again (experts, data, tuning, final runs) with that trainer; its earlier records are kept
apart (``benchmarks/results/bench_control_round2_ant_before_clamp_fix.json``). Hopper, HalfCheetah
and Walker2d keep the records the earlier trainer made (each record names its commit), and
Walker2d's secondary runs not yet made are made by it too (a checkout of commit e93cfa4 with its
extension built), so that each task's records come from one trainer: the clamp binds there rarely
or not at all, and the same trainer served every method of a task.
Outputs: benchmarks/results/bench_control_round2_<profile>.json + .png (device, versions, commit
of every invocation that made records).
Compute: per task 7 experts, 32 tuning runs and 85 final runs, about 110 of them 1M-step RL runs of
~3 core-minutes each on a 2-core x86 CPU (Hopper; Ant slower): ~5.5 core-hours per task, so the grid
runs in slices (``--tasks``, ``--stage tune``; finished runs are kept as records and skipped;
after a task's tuning, its final runs are queued so that a slice cut short leaves whole primary
cells: bc and irl first, then budget by budget from the smallest, each on every final seed).
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

from common import (  # noqa: E402
    check_grid,
    ci95,
    commit,
    cpu_name,
    grid_arguments,
    lock_records,
    mean_signal,
    read_records,
    remake_inputs_first,
    restore_records,
    run_jobs,
    save_grid_result,
    saved_records,
    versions,
)

TREATMENT_FILE = ROOT / "benchmarks" / "results" / "bench_termination_small.json"
PROFILES = {
    "tiny": dict(tasks=["Hopper-v5"], tune_seeds=[200], final_seeds=[10], budgets=[8], tune_budget=8, noisy_budgets=[8],
                 expert_steps=8 * 8 * 32, method_steps=2 * 8 * 32, num_envs=8, rollout_steps=32, num_demos=4,
                 heldout_demos=1, pairs=8, heldout_pairs=4, segment_len=10, pool_episodes=2, eval_episodes=2,
                 eval_every=1, workers=1, rlhf_reward_steps=20, bc_init_steps=20, bc_grid=[10, 20, 40, 80],
                 treatments=dict(irl="raw+horizon", rlhf="raw+horizon")),
    "full": dict(tasks=["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5"], tune_seeds=[200, 201],
                 final_seeds=[10, 11, 12, 13, 14], budgets=[10, 50, 200, 1000], tune_budget=50, noisy_budgets=[10, 200],
                 expert_steps=1_000_000, method_steps=1_000_000, num_envs=16, rollout_steps=128, num_demos=12,
                 heldout_demos=2, pairs=1000, heldout_pairs=100, segment_len=50, pool_episodes=8, eval_episodes=10,
                 eval_every=10, workers=16, rlhf_reward_steps=2000, bc_init_steps=2000,
                 bc_grid=[1000, 2000, 5000, 10000], treatments=None),
}
GRID = {
    "irl": [dict(reward_lr=lr, reward_steps=k) for lr in (3e-4, 1e-4) for k in (5, 1)],
    "aihf": [dict(reward_lr=lr, reward_steps=k) for lr in (3e-4, 1e-4) for k in (5, 1)],
    "rlhf": [dict(reward_lr=lr, reward_l2=l2) for lr in (3e-4, 1e-4) for l2 in (1e-3, 1e-2)],
}
LABEL_NOISE = 0.2


def treatments(prof) -> dict:
    """{method: "rl_reward+termination"} of bench_termination's rule (aihf: irl's)."""
    if prof.get("treatments"):
        t = dict(prof["treatments"])
    else:
        if not TREATMENT_FILE.is_file():
            raise SystemExit(f"{TREATMENT_FILE} is missing: run benchmarks/bench_termination.py --profile small first")
        t = dict(json.loads(TREATMENT_FILE.read_text())["analysis"]["choice"])
    t.setdefault("aihf", t["irl"])
    return t


def _grid(method, prof):
    return [dict(bc_steps=n) for n in prof["bc_grid"]] if method == "bc" else GRID[method]


def plan(prof):
    jobs = []
    for task in prof["tasks"]:
        for s in [*prof["tune_seeds"], *prof["final_seeds"]]:
            e, d = f"expert-{task}-s{s}", f"data-{task}-s{s}"
            stage = "tune" if s in prof["tune_seeds"] else "final"  # a --stage tune slice skips the final seeds' data
            jobs.append(dict(kind="expert", stage=stage, key=e, deps=[], task=task, seed=s, cost=100))
            jobs.append(dict(kind="data", stage=stage, key=d, deps=[e], task=task, seed=s, cost=50))
        tune_keys = {}
        for m in ("bc", "irl", "rlhf", "aihf"):
            b = prof["tune_budget"] if m in ("rlhf", "aihf") else 0
            tune_keys[m] = []
            for c in range(4):
                for s in prof["tune_seeds"]:
                    k = f"tune-{m}-c{c}-{task}-s{s}"
                    tune_keys[m].append(k)
                    jobs.append(dict(kind="run", stage="tune", key=k, deps=[f"data-{task}-s{s}"], task=task, seed=s,
                                     method=m, budget=b, config=c, arm="clean", start="bc", cost=1 if m == "bc" else 10))
        for s in prof["final_seeds"]:
            cells = [("bc", 0, "clean", "bc"), ("irl", 0, "clean", "bc"), ("irl", 0, "clean", "scratch")]
            for m in ("rlhf", "aihf"):
                cells += [(m, b, "clean", "bc") for b in prof["budgets"]]
                cells += [(m, b, "noisy", "bc") for b in prof["noisy_budgets"]]
                cells.append((m, min(prof["budgets"]), "clean", "scratch"))
            for m, b, arm, start in cells:
                jobs.append(dict(kind="run", stage="final", key=f"{m}-{arm}-{start}-p{b}-{task}-s{s}",
                                 deps=[f"data-{task}-s{s}", *tune_keys[m]], task=task, seed=s, method=m, budget=b,
                                 arm=arm, start=start, cost=_final_priority(m, b, arm, start, prof)))
    return jobs


def _final_priority(method, budget, arm, start, prof) -> int:
    """Order of the final runs (higher first; scheduling only): bc and irl, then the primary
    comparison budget by budget from the smallest, then the secondary arms, each on every seed in
    turn, so that a slice cut short leaves whole cells (all final seeds) of the primary verdict.
    Used when a task's tuning is made before its final runs are queued (``--stage tune`` first)."""
    budgets = sorted({*prof["budgets"], *prof["noisy_budgets"]})
    later = len(budgets) - budgets.index(budget) if budget in budgets else 0
    if method in ("bc", "irl") and start == "bc":
        return 50 - (method == "irl")
    return (30 if arm == "clean" and start == "bc" else 10) + later


def _init_worker(threads):
    import torch

    torch.set_num_threads(threads)


def selection_signal(rec) -> tuple:
    """Larger is better: bc by -held-out demonstration NLL; the reward methods by held-out pair
    accuracy, then -held-out pair NLL (each at the last evaluation)."""
    if rec.get("diverged"):  # the amendment: a diverged tuning run's configuration is the worst
        return (-np.inf,) if rec["method"] == "bc" else (-np.inf, -np.inf)
    last = rec["evals"][-1]
    if rec["method"] == "bc":
        sig = (-last["eval/heldout_demo_nll"],)
    else:
        sig = (last["reward/heldout_accuracy"], -last["reward/heldout_nll"])
    return tuple(-np.inf if not np.isfinite(v) else float(v) for v in sig)  # a diverged run is the worst


def select(records: dict, task: str, method: str, prof) -> dict:
    """The tuned configuration of (task, method): the best mean selection signal over the tuning seeds."""
    best = None
    for c in range(4):
        recs = [records[f"tune-{method}-c{c}-{task}-s{s}"] for s in prof["tune_seeds"]]
        ran = next((r["chosen"]["options"] for r in recs if r["chosen"]["options"] != _grid(method, prof)[c]), None)
        if ran is not None:
            raise SystemExit(f"tuning records of {task}/{method} configuration {c} ran {ran}, but the grid's "
                             f"configuration {c} is now {_grid(method, prof)[c]}: the grid changed since they were "
                             "made; use a new --work")
        mean = mean_signal(map(selection_signal, recs))
        if best is None or mean > best[1]:
            best = (c, mean)
    return dict(config=best[0], signal=list(best[1]), options=_grid(method, prof)[best[0]])



def run_job(job, prof, work, treat, head):
    from aihf_fast.train.control.config import ControlConfig, fixed_horizon_options
    from aihf_fast.train.control.datagen import make_data
    from aihf_fast.train.control.trainer import train

    task, s = job["task"], job["seed"]
    root = os.path.join(work, f"{task}-s{s}")
    common = dict(task=task, seed=s, num_envs=prof["num_envs"], rollout_steps=prof["rollout_steps"],
                  eval_episodes=prof["eval_episodes"], eval_every=prof["eval_every"], progress=False, overwrite=True,
                  sim_threads=1)
    if job["kind"] == "expert":
        summ = train(ControlConfig(method="expert", env_steps=prof["expert_steps"], save_every=prof["eval_every"],
                                   output_dir=os.path.join(root, "expert"), **common))
        return dict(kind="expert", task=task, seed=s, evals=summ["evals"], sim_seconds=summ["sim_seconds"],
                    learn_seconds=summ["learn_seconds"], env_steps=summ["env_steps"], commit=head)
    if job["kind"] == "data":
        metas = {}
        for arm, noise in (("clean", 0.0), ("noisy", LABEL_NOISE)):
            metas[arm] = make_data(os.path.join(root, "expert"), os.path.join(root, f"data-{arm}"),
                                   num_demos=prof["num_demos"], demo_quality=0.7,
                                   num_pairs=prof["pairs"] + prof["heldout_pairs"], segment_len=prof["segment_len"],
                                   pool_episodes=prof["pool_episodes"], label_noise=noise, seed=s)
        return dict(kind="data", task=task, seed=s, meta=metas["clean"], meta_noisy=metas["noisy"], commit=head)
    m, b = job["method"], job["budget"]
    if job["stage"] == "tune":
        chosen = dict(config=job["config"], options=_grid(m, prof)[job["config"]])
    else:
        rec_dir = os.path.join(work, "records")
        keys = [f"tune-{m}-c{c}-{task}-s{t}" for c in range(4) for t in prof["tune_seeds"]]
        chosen = select(read_records(rec_dir, keys), task, m, prof)
    data = os.path.join(root, f"data-{job['arm']}")
    kw = dict(chosen["options"], demonstrations=os.path.join(data, "demos.npz"), heldout_demos=prof["heldout_demos"])
    if m != "bc":
        rl_reward, termination = treat[m].split("+")
        if termination == "absorbing" and fixed_horizon_options(task) == {}:
            termination = "env"  # a task that never ends early: nothing to absorb, the same run
        kw.update(rl_reward=rl_reward, termination=termination, bc_init=job["start"] == "bc",
                  bc_steps=prof["bc_init_steps"], preferences=os.path.join(data, "prefs.npz"),
                  heldout_pairs=prof["heldout_pairs"], rlhf_reward_steps=prof["rlhf_reward_steps"])
        if m in ("rlhf", "aihf"):
            kw["num_pairs"] = b
        else:  # irl: the pairs are read for the held-out metrics only
            kw["num_pairs"] = 0
    out = os.path.join(work, "runs", job["key"])
    diverged = None
    try:
        summ = train(ControlConfig(method=m, env_steps=prof["method_steps"], output_dir=out, **common, **kw))
    except FloatingPointError as e:  # a diverged PPO update: the amendment's rule (the run up to it)
        summ, diverged = None, str(e)
    effective = None if m == "bc" else f"{kw['rl_reward']}+{kw['termination']}"
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        log = list(map(json.loads, f))
    corr = [[r["env_steps"], r["reward/corr_true"]] for r in log if r.get("reward/corr_true") is not None]
    shutil.rmtree(out, ignore_errors=True)
    if summ is None:
        timed = [r for r in log if "sim_s" in r]
        summ = dict(evals=[r for r in log if "eval/return" in r], sim_seconds=timed[-1]["sim_s"] if timed else 0.0,
                    learn_seconds=timed[-1]["learn_s"] if timed else 0.0, env_steps=log[-1].get("env_steps", 0))
        diverged = dict(message=diverged, iteration=log[-1].get("iter"), env_steps=summ["env_steps"])
    ev = summ["evals"]
    return dict(kind="run", key=job["key"], stage=job["stage"], task=task, seed=s, method=m, budget=b, arm=job["arm"],
                start=job["start"], chosen=chosen, treatment=None if m == "bc" else treat[m], effective_treatment=effective, evals=ev, reward_corr=corr,
                corr_last10=float(np.mean([c[1] for c in corr[-10:]])) if corr else None,
                final=float(np.mean([e["eval/return"] for e in ev[-3:]])),
                length=float(np.mean([e["eval/length"] for e in ev[-3:]])), device=cpu_name(),
                sim_seconds=summ["sim_seconds"], learn_seconds=summ["learn_seconds"], env_steps=summ["env_steps"],
                diverged=diverged, commit=head)


def _input_fingerprint(rec) -> tuple:
    """What must match when an expert or a dataset is remade: the expert's evaluation returns, or
    the data's statistics (returns of the demonstrations, label agreement, ...; not its path)."""
    if rec["kind"] == "expert":
        return tuple(e["eval/return"] for e in rec["evals"])
    return tuple(json.dumps({k: v for k, v in rec[m].items() if k != "expert_dir"}, sort_keys=True)
                 for m in ("meta", "meta_noisy"))


def _paired(a: dict, b: dict):
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    return seeds, (float(np.mean(d)) if d else None), (ci95(d) if len(d) > 1 else None)


def _not_below(diff, half):
    """The paired test: the interval's upper end >= 0; None without an interval (< 2 seeds)."""
    return None if diff is None or half is None else bool(diff + half >= 0)


def analyse(records, prof):
    runs = [r for r in records.values() if r.get("kind") == "run" and r.get("stage") == "final"]
    data = {(r["task"], r["seed"]): r["meta"] for r in records.values() if r.get("kind") == "data"}
    table, verdict, chosen = [], [], {}
    for task in prof["tasks"]:
        for m in ("bc", "irl", "rlhf", "aihf"):
            tuned = [r for r in records.values() if r.get("stage") == "final" and r["task"] == task and r["method"] == m]
            if tuned:  # every final run of a method runs the one configuration its tuning records pick
                ran = sorted({r["chosen"]["config"] for r in tuned})
                made = all(f"tune-{m}-c{c}-{task}-s{s}" in records for c in range(4) for s in prof["tune_seeds"])
                if len(ran) > 1 or (made and ran != [select(records, task, m, prof)["config"]]):
                    raise SystemExit(f"final runs of {task}/{m} ran configuration(s) {ran}, but its tuning records "
                                     "pick one other or there is more than one: the tuning records changed after "
                                     "those runs were made; redo them")
                chosen[f"{task}/{m}"] = tuned[0]["chosen"]

        def cell(m, b, arm="clean", start="bc", task=task):
            return {r["seed"]: r for r in runs if (r["task"], r["method"], r["budget"], r["arm"], r["start"]) ==
                    (task, m, b, arm, start)}

        keys = sorted({(r["method"], r["budget"], r["arm"], r["start"]) for r in runs if r["task"] == task})
        for m, b, arm, start in keys:
            per = cell(m, b, arm, start)
            v = [per[s]["final"] for s in sorted(per)]
            table.append(dict(task=task, method=m, budget=b, arm=arm, start=start, seeds=sorted(per), returns=v,
                              mean=float(np.mean(v)), ci95=ci95(v),
                              length=float(np.mean([per[s]["length"] for s in per])),
                              corr_last10=[per[s]["corr_last10"] for s in sorted(per)],
                              heldout_accuracy=[per[s]["evals"][-1].get("reward/heldout_accuracy") for s in sorted(per)],
                              diverged_seeds=[s for s in sorted(per) if per[s].get("diverged")]))
        ret = lambda c: {s: r["final"] for s, r in c.items()}  # noqa: E731
        rand = float(np.mean([v["random_return"] for (t, s), v in data.items() if t == task and s in prof["final_seeds"]]
                             or [np.nan]))
        smallest = min(prof["budgets"])
        for arm, start, budgets in (("clean", "bc", prof["budgets"]), ("noisy", "bc", prof["noisy_budgets"]),
                                    ("clean", "scratch", [smallest])):
            for b in budgets:
                a, h = ret(cell("aihf", b, arm, start)), ret(cell("rlhf", b, arm, start))
                seeds, diff, half = _paired(a, h)
                if not seeds:
                    continue
                others = (ret(cell("bc", 0, "clean", "bc")), ret(cell("irl", 0, "clean", start)))
                n = len(prof["final_seeds"])
                row = dict(task=task, budget=b, arm=arm, start=start, seeds=seeds,
                           # aihf, rlhf, bc and irl paired on every final seed
                           complete=len(seeds) == n and all(len(set(o) & set(seeds)) == n for o in others),
                           primary=arm == "clean" and start == "bc", aihf=float(np.mean([a[s] for s in seeds])),
                           rlhf=float(np.mean([h[s] for s in seeds])), diff_vs_rlhf=diff, diff_vs_rlhf_ci95=half,
                           aihf_not_below_rlhf=_not_below(diff, half))
                mine = cell("aihf", b, arm, start)
                for other, o in (("rlhf", cell("rlhf", b, arm, start)), ("bc", cell("bc", 0, "clean", "bc")),
                                 ("irl", cell("irl", 0, "clean", start))):
                    if other != "rlhf":
                        _, dd, hh = _paired(a, ret(o))
                        row[f"diff_vs_{other}"], row[f"diff_vs_{other}_ci95"] = dd, hh
                        row[f"aihf_not_below_{other}"] = _not_below(dd, hh)
                    # the amendment's sensitivity check: the difference without the seeds where either diverged
                    both = sorted(set(mine) & set(o))
                    gone = [s for s in both if mine[s].get("diverged") or o[s].get("diverged")]
                    if gone:
                        kept = [s for s in both if s not in gone]
                        _, d2, h2 = _paired({s: a[s] for s in kept}, {s: o[s]["final"] for s in kept})
                        row[f"diverged_seeds_vs_{other}"] = gone
                        row[f"diff_vs_{other}_without_diverged"] = d2
                        row[f"diff_vs_{other}_without_diverged_ci95"] = h2
                if b == smallest:
                    row["aihf_ge_1.2x_rlhf"] = bool(row["aihf"] >= 1.2 * row["rlhf"]) if row["rlhf"] > 0 else None
                    row["gain_over_random_ratio"] = ((row["aihf"] - rand) / (row["rlhf"] - rand)
                                                     if row["rlhf"] > rand else None)
                verdict.append(row)
    steps = sum(r["env_steps"] for r in runs)
    wall = dict(sim_seconds_per_100k=1e5 * sum(r["sim_seconds"] for r in runs) / steps if steps else None,
                learn_seconds_per_100k=1e5 * sum(r["learn_seconds"] for r in runs) / steps if steps else None,
                run_seconds=sum(r["sim_seconds"] + r["learn_seconds"] for r in records.values() if "sim_seconds" in r))
    primary = [v for v in verdict if v["primary"]]
    expected = len(prof["tasks"]) * len(prof["budgets"])
    complete = len(primary) == expected and all(v["complete"] for v in primary)
    # the goal is stated only on the whole primary grid (every task and budget, every final seed)
    goal = dict(cells=len(primary), not_below_rlhf_everywhere=all(v["aihf_not_below_rlhf"] for v in primary),
                ge_1_2x_rlhf_at_smallest=[v.get("aihf_ge_1.2x_rlhf") for v in primary if v["budget"] == min(prof["budgets"])],
                not_below_bc_and_irl=all(v["aihf_not_below_bc"] and v["aihf_not_below_irl"] for v in primary)) \
        if complete else dict(incomplete=f"{sum(v['complete'] for v in primary)} of {expected} primary cells have every "
                                         "final seed")
    return dict(table=table, verdict=verdict, goal=goal, chosen=chosen, tuning=tuning(records, prof), wall_clock=wall)


def tuning(records, prof) -> dict:
    """Per task and method whose tuning runs are all made: each configuration's selection signal
    (mean over the tuning seeds) and, for information only (the rule never reads it), its true
    return; the configuration the rule picks."""
    out = {}
    for task in prof["tasks"]:
        for m in ("bc", "irl", "rlhf", "aihf"):
            keys = {(c, s): f"tune-{m}-c{c}-{task}-s{s}" for c in range(4) for s in prof["tune_seeds"]}
            if not all(k in records for k in keys.values()):
                continue
            configs = []
            for c in range(4):
                recs = [records[keys[c, s]] for s in prof["tune_seeds"]]
                configs.append(dict(options=_grid(m, prof)[c], signal=list(mean_signal(map(selection_signal, recs))),
                                    true_return=float(np.mean([r["final"] for r in recs]))))
            out[f"{task}/{m}"] = dict(chosen=select(records, task, m, prof)["config"], configs=configs)
    return out


def plot(result, prof, path):
    """Per task: true return vs pairs (primary arm, mean +- 95% CI), bc / irl lines; corr(r_theta, r)
    on the policy's own batches vs env steps for rlhf and aihf at the smallest budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = prof["tasks"]
    color = {("rlhf", "clean"): "C0", ("rlhf", "noisy"): "C1", ("aihf", "clean"): "C2", ("aihf", "noisy"): "C3"}
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
    rows = result["analysis"]["table"]
    runs = [r for r in result["records"] if r.get("kind") == "run" and r.get("stage") == "final"]
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        for m, style in (("rlhf", "-"), ("aihf", "-")):
            for arm, ls in (("clean", style), ("noisy", ":")):
                pts = sorted((r["budget"], r["mean"], r["ci95"]) for r in rows
                             if (r["task"], r["method"], r["arm"], r["start"]) == (task, m, arm, "bc"))
                if pts:
                    x, y, c = (np.array(v, float) for v in zip(*pts))
                    ax.plot(x, y, ls=ls, marker="o", label=f"{m} ({arm} labels)", lw=2.5 if m == "aihf" else 1.2,
                            color=color[m, arm])  # the same colour in every panel, whatever is made yet
                    ax.fill_between(x, y - np.nan_to_num(c), y + np.nan_to_num(c), alpha=0.15, color=color[m, arm])
        for m, ls in (("bc", "--"), ("irl", "-.")):
            for r in rows:
                if (r["task"], r["method"], r["start"]) == (task, m, "bc"):
                    ax.axhline(r["mean"], color="k", ls=ls, lw=0.8, label=f"{m} (no pairs)")
        ax.set_xscale("log")
        ax.set_xlabel("preference pairs")
        ax.set_ylabel("true return (last 3 evaluations)")
        ax.set_title(task)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        b0 = min(prof["budgets"])
        for m in ("rlhf", "aihf"):
            sel = [r["reward_corr"] for r in runs if (r["task"], r["method"], r["budget"], r["arm"], r["start"]) ==
                   (task, m, b0, "clean", "bc") and r["reward_corr"]]
            if sel:
                n = min(len(c) for c in sel)
                cur = np.mean([np.asarray(c[:n], float) for c in sel], axis=0)
                axes[1][col].plot(cur[:, 0], cur[:, 1], label=f"{m}, {b0} pairs", color=color[m, "clean"])
        axes[1][col].set_xlabel("env steps")
        axes[1][col].set_ylabel("corr(learned, true reward) on own batches")
        if axes[1][col].get_legend_handles_labels()[0]:
            axes[1][col].legend(fontsize=7)
    fig.suptitle(f"{result['device']} commit {str(result['commit'])[:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = grid_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), PROFILES, "full")
    ap.add_argument("--tasks", nargs="+", default=None, help="a slice: only these tasks of the profile")
    ap.add_argument("--stage", choices=("tune", "all"), default="all", help="tune: stop after the tuning runs")
    ap.add_argument("--analyse-only", action="store_true", help="run nothing: analyse the records in --work")
    ap.add_argument("--records-from", default=None, metavar="JSON",
                    help="a saved result (e.g. on a machine without --work): its records join the analysis, and "
                         "go into --work where nothing has to be remade for them")
    a = ap.parse_args(argv)
    prof = dict(PROFILES[a.profile])
    if a.tasks:
        unknown = sorted(set(a.tasks) - set(prof["tasks"]))
        if unknown:
            raise SystemExit(f"--tasks: {unknown} are not tasks of profile {a.profile} ({prof['tasks']})")
    work = a.work or str(ROOT / "runs" / f"bench_control_round2_{a.profile}")
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_control_round2_{a.profile}.json")
    head, t0 = commit(), time.time()
    rec_dir = os.path.join(work, "records")
    if not a.analyse_only:
        lock_records(rec_dir)
    signature = dict(benchmark="bench_control_round2", profile_config=prof, label_noise=LABEL_NOISE,
                     grids={m: _grid(m, prof) for m in ("bc", "irl", "rlhf", "aihf")})
    check_grid(rec_dir, signature, write=False)
    saved = {}
    if a.records_from is not None:  # expert and data records carry no key
        saved = saved_records(a.records_from, "bench_control_round2", prof,
                              lambda r: r.get("key") or f"{r['kind']}-{r['task']}-s{r['seed']}")

    def have():  # every record of the whole protocol made so far (by any slice; saved ones not remade yet)
        keys = [j["key"] for j in plan(prof)]
        made = {**saved, **read_records(rec_dir, keys, missing_ok=True)}
        return {k: made[k] for k in keys if k in made}

    made = [r for r in have().values() if r.get("treatment")]
    where = rec_dir + (f" or {a.records_from}" if saved else "")
    if a.analyse_only:
        treat = {r["method"]: r["treatment"] for r in made}
        mixed = sorted({r["method"] for r in made if r["treatment"] != treat[r["method"]]})
        if mixed:
            raise SystemExit(f"records in {where} ran {mixed} under more than one end-of-episode treatment")
    else:
        treat = treatments(prof)
        stale = sorted({r["key"] for r in made if r["treatment"] != treat[r["method"]]})
        if stale:
            raise SystemExit(f"{len(stale)} records in {where} ran another end-of-episode treatment than "
                             f"{TREATMENT_FILE.name} now chooses ({treat}), e.g. {stale[0]}: use a new --work"
                             + (" without --records-from" if saved else ""))
        odd = sorted(r["key"] for r in have().values() if str(r.get("key")).startswith("tune-")
                     and r["chosen"]["options"] != _grid(r["method"], prof)[r["chosen"]["config"]])
        if odd:
            raise SystemExit(f"{len(odd)} tuning records in {where} ran another configuration than the grid's, e.g. "
                             f"{odd[0]}: use a new --work" + (" without --records-from" if saved else ""))
        check_grid(rec_dir, signature, write=True)  # every check passed: this --work holds this grid
        jobs = [j for j in plan(dict(prof, tasks=a.tasks or prof["tasks"]))
                if a.stage == "all" or j.get("stage") != "final"]
        written, removed = restore_records(saved, plan(prof), rec_dir, a.records_from or "", fingerprint=_input_fingerprint)
        if written or removed:
            print(f"[bench] {len(written)} records restored from {a.records_from}; {len(removed)} restored inputs "
                  "to remake (a job that needs their files runs)")

        def run(js):
            run_jobs(js, run_job, (prof, work, treat, head), rec_dir, a.workers or prof["workers"], _init_worker,
                     (a.threads,))

        remake_inputs_first(jobs, plan(prof), rec_dir, run, _input_fingerprint)
        run(jobs)
    records = have()
    analysis = analyse(records, prof)
    analysis["missing"] = [j["key"] for j in plan(prof) if j["key"] not in records]  # of the whole protocol
    result = dict(benchmark="bench_control_round2", profile=a.profile, profile_config=prof, treatments=treat,
                  device=cpu_name(), versions=versions("mujoco", "gymnasium"), commit=head,
                  made_by_commits=sorted({r.get("commit", head) for r in records.values()}),
                  wall_seconds_this_invocation=time.time() - t0,
                  command="python benchmarks/bench_control_round2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  analysis=analysis, records=list(records.values()))
    save_grid_result(result, out, lambda r, png: plot(r, prof, png))
    for v in analysis["verdict"]:
        half = "n/a" if v["diff_vs_rlhf_ci95"] is None else f"{v['diff_vs_rlhf_ci95']:.1f}"
        print(f"{v['task']:<15} {v['budget']:>5} pairs {v['arm']:<5} {v['start']:<7}: aihf {v['aihf']:8.1f} rlhf "
              f"{v['rlhf']:8.1f} diff {v['diff_vs_rlhf']:+.1f} +- {half} ({len(v['seeds'])} seeds)")
    for name, t in analysis["tuning"].items():
        print(f"tuned {name}: configuration {t['chosen']} " + "; ".join(
            f"{c['options']} signal {[round(v, 3) for v in c['signal']]} return {c['true_return']:.0f}"
            for c in t["configs"]))
    print(f"goal: {analysis['goal']}; {len(analysis['missing'])} runs missing")
    print(f"[bench] wrote {out}")
    return result


if __name__ == "__main__":
    main()
