"""The paper's control claim, measured: AIHF against RLHF (and BC, IRL) on MuJoCo as the number of
preference pairs grows, demonstrations fixed. Every run is ``aihf_fast.train.control``.

    python benchmarks/bench_alignment_control.py --profile small    # Hopper + HalfCheetah, 3 seeds (2-core CPU)
    python benchmarks/bench_alignment_control.py --profile walker_ant  # Walker2d + Ant, 10 pairs (16 cores, ~10 min)
    python benchmarks/bench_alignment_control.py --profile full     # + Walker2d, Ant; 5 seeds; bigger budgets

Protocol (fixed before any result was seen; profiles change sizes only)
---------------------------------------------------------------------
Per task and seed: an expert by PPO on the true reward (``expert_steps``), its snapshots the pool;
``num_demos`` demonstration episodes from the snapshot closest to random + ``demo_quality`` x
(best - random); ``max(budgets)`` preference pairs of ``segment_len``-step segments from all
snapshots plus a random policy, Bradley-Terry labels (temperature 1), nested budgets. Methods, each
``method_steps`` env steps of the same PPO, reward model and reward-step settings (trainer defaults):
bc (no env steps), irl (= aihf at 0 pairs: the same run, so it is run once), rlhf and aihf (w_D = w_P = 1)
at budgets > 0. Reported per run: the mean true return of the deterministic policy over the last 3
evaluations (10 episodes each; fixed compute, no selection). Seeds are paired (same expert, data and evaluation resets).
Target (the issue's): aihf >= rlhf at every budget, and >= 1.2 x rlhf at the smallest non-zero
budget. Wall-clock per 100k env steps is split into simulation (C++ rollouts) and learning.
Outputs: benchmarks/results/bench_alignment_control_<profile>.json + .png (device, versions, commit).
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
    sys.path.insert(0, str(ROOT))  # (else the installed package, with its built C++ extension)
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ci95, commit, cpu_name, run_jobs, versions  # noqa: E402

PROFILES = {
    "tiny": dict(tasks=["InvertedPendulum-v5"], seeds=[0], budgets=[0, 8], expert_steps=8 * 8 * 64,
                 method_steps=2 * 8 * 32, num_envs=8, rollout_steps=32, num_demos=2, segment_len=10, pool_episodes=2,
                 eval_episodes=2, eval_every=1, workers=1),
    "small": dict(tasks=["Hopper-v5", "HalfCheetah-v5"], seeds=[0, 1, 2], budgets=[0, 10, 50, 200, 1000],
                  expert_steps=1_000_000, method_steps=300_000, num_envs=16, rollout_steps=128, num_demos=10,
                  segment_len=50, pool_episodes=8, eval_episodes=10, eval_every=10, workers=2),
    # what fits one 10-minute call of a 16-core machine: two more tasks at the smallest budget, 400k-step
    # experts, one worker per run (18 RL runs at once)
    "walker_ant": dict(tasks=["Walker2d-v5", "Ant-v5"], seeds=[0, 1, 2], budgets=[0, 10], expert_steps=400_000,
                       method_steps=300_000, num_envs=16, rollout_steps=128, num_demos=10, segment_len=50,
                       pool_episodes=4, eval_episodes=10, eval_every=15, workers=18, sim_threads=1),
    "full": dict(tasks=["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5"], seeds=[0, 1, 2, 3, 4],
                 budgets=[0, 10, 50, 200, 1000, 5000], expert_steps=3_000_000, method_steps=1_000_000, num_envs=32,
                 rollout_steps=128, num_demos=10, segment_len=50, pool_episodes=16, eval_episodes=10, eval_every=10,
                 workers=16, sim_threads=1),
}
METHODS = ("bc", "irl", "rlhf", "aihf")
POSTHOC = ("irl+bc", "rlhf+bc", "aihf+bc")  # --posthoc: the actor initialised by BC (chosen after the main results)


def plan(prof):
    jobs = []
    for task in prof["tasks"]:
        for s in prof["seeds"]:
            e, d = f"expert-{task}-s{s}", f"data-{task}-s{s}"
            jobs.append(dict(kind="expert", key=e, deps=[], task=task, seed=s, cost=100))
            jobs.append(dict(kind="data", key=d, deps=[e], task=task, seed=s, cost=50))
            for m in METHODS:
                for b in prof["budgets"]:
                    if (m in ("rlhf", "aihf") and b == 0) or (m in ("bc", "irl") and b != 0):
                        continue  # aihf at 0 pairs runs exactly irl (w_P = 0, same seed): irl stands for it
                    jobs.append(dict(kind="run", key=f"{m}-{task}-s{s}-p{b}", deps=[d], task=task, seed=s,
                                     method=m, budget=b, cost=1 if m == "bc" else 10))
            if prof.get("posthoc"):  # added after the main results were seen: the actor starts from BC
                smallest = min(b for b in prof["budgets"] if b > 0)
                for m, b in (("irl+bc", 0), ("rlhf+bc", smallest), ("aihf+bc", smallest)):
                    jobs.append(dict(kind="run", key=f"{m}-{task}-s{s}-p{b}", deps=[d], task=task, seed=s,
                                     method=m, budget=b, cost=5))
    return jobs


def _init_worker(threads):
    import torch

    torch.set_num_threads(threads)


def run_job(job, prof, work):
    from aihf_fast.train.control.config import ControlConfig
    from aihf_fast.train.control.datagen import make_data
    from aihf_fast.train.control.trainer import train

    task, s = job["task"], job["seed"]
    root = os.path.join(work, f"{task}-s{s}")
    common = dict(task=task, seed=s, num_envs=prof["num_envs"], rollout_steps=prof["rollout_steps"],
                  eval_episodes=prof["eval_episodes"], eval_every=prof["eval_every"], progress=False, overwrite=True,
                  sim_threads=prof.get("sim_threads"))
    if job["kind"] == "expert":
        summ = train(ControlConfig(method="expert", env_steps=prof["expert_steps"], save_every=prof["eval_every"],
                                   output_dir=os.path.join(root, "expert"), **common))
        return dict(kind="expert", task=task, seed=s, evals=summ["evals"], sim_seconds=summ["sim_seconds"],
                    learn_seconds=summ["learn_seconds"], env_steps=summ["env_steps"])
    if job["kind"] == "data":
        meta = make_data(os.path.join(root, "expert"), os.path.join(root, "data"), num_demos=prof["num_demos"],
                         demo_quality=0.7, num_pairs=max(prof["budgets"]), segment_len=prof["segment_len"],
                         pool_episodes=prof["pool_episodes"], seed=s)
        return dict(kind="data", task=task, seed=s, meta=meta)
    out = os.path.join(work, "runs", job["key"])
    m, b = job["method"], job["budget"]
    base = m.removesuffix("+bc")
    uses_pairs = base in ("rlhf", "aihf")
    summ = train(ControlConfig(method=base, bc_init=m.endswith("+bc"), env_steps=prof["method_steps"],
                               demonstrations=os.path.join(root, "data", "demos.npz"),
                               preferences=os.path.join(root, "data", "prefs.npz") if uses_pairs else None,
                               num_pairs=b if uses_pairs else None, output_dir=out, **common))
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:  # corr(r_theta, r) on each PPO batch
        corr = [[r["env_steps"], r["reward/corr_true"]] for r in map(json.loads, f) if r.get("reward/corr_true") is not None]
    shutil.rmtree(out, ignore_errors=True)
    ev = summ["evals"]
    return dict(kind="run", key=job["key"], task=task, seed=s, method=m, budget=b, device=cpu_name(), evals=ev, reward_corr=corr,
                final=float(np.mean([e["eval/return"] for e in ev[-3:]])), sim_seconds=summ["sim_seconds"],
                learn_seconds=summ["learn_seconds"], env_steps=summ["env_steps"])


def analyse(records, prof):
    runs = [r for r in records.values() if r.get("kind") == "run"]
    data = {(r["task"], r["seed"]): r["meta"] for r in records.values() if r.get("kind") == "data"}
    table, verdict = [], []
    methods = [*METHODS, *(m for m in POSTHOC if any(r["method"] == m for r in runs))]
    for task in prof["tasks"]:
        for m in methods:
            for b in prof["budgets"]:
                src = "irl" if (m == "aihf" and b == 0) else m  # see plan()
                per = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == src and
                       (r["budget"] == b or (src in ("bc", "irl") and r["budget"] == 0))}
                if not per:
                    continue
                v = [per[s]["final"] for s in sorted(per)]
                table.append(dict(task=task, method=m, budget=b, seeds=sorted(per), returns=v, mean=float(np.mean(v)),
                                  ci95=ci95(v)))
        smallest = min([b for b in prof["budgets"] if b > 0], default=None)
        for b, suffix in [(b, "") for b in prof["budgets"]] + [(smallest, "+bc")]:
            a = {r["seed"]: r["final"] for r in runs if r["task"] == task and r["method"] == "aihf" + suffix and r["budget"] == b}
            h = {r["seed"]: r["final"] for r in runs if r["task"] == task and r["method"] == "rlhf" + suffix and r["budget"] == b}
            common_seeds = sorted(set(a) & set(h))
            if not common_seeds:
                continue
            d = [a[s] - h[s] for s in common_seeds]
            row = dict(task=task, budget=b, aihf=float(np.mean([a[s] for s in common_seeds])),
                       rlhf=float(np.mean([h[s] for s in common_seeds])), diff=float(np.mean(d)), diff_ci95=ci95(d),
                       variant="bc_init (post hoc)" if suffix else "main")
            row["aihf_ge_rlhf"] = row["diff"] >= 0
            if b == smallest:  # "20% higher" needs a positive rlhf return; the gain over random is reported too
                rand = float(np.mean([m["random_return"] for (t, _), m in data.items() if t == task] or [np.nan]))
                row["aihf_ge_1.2x_rlhf"] = bool(row["aihf"] >= 1.2 * row["rlhf"]) if row["rlhf"] > 0 else None
                row["gain_over_random_ratio"] = (row["aihf"] - rand) / (row["rlhf"] - rand) if row["rlhf"] > rand else None
            verdict.append(row)
    def per_100k(rs):  # simulation = collecting PPO batches in C++; learning = reward steps + PPO updates
        sim, learn, steps = (sum(r[k] for r in rs) for k in ("sim_seconds", "learn_seconds", "env_steps"))
        return dict(sim_seconds_per_100k=1e5 * sim / steps if steps else None,
                    learn_seconds_per_100k=1e5 * learn / steps if steps else None)

    wall = dict(per_100k(runs), by_task_method={f"{t}/{m}": per_100k([r for r in runs if r["task"] == t and r["method"] == m])
                                                for t in prof["tasks"] for m in sorted({r["method"] for r in runs})
                                                if m != "bc" and any(r["task"] == t and r["method"] == m for r in runs)},
                note="evaluation episodes are not included")
    experts = [r for r in records.values() if r.get("kind") == "expert"]

    def true_reward_at_method_steps(task):  # PPO on the true reward, same steps and reporting rule as the methods
        v = [np.mean([e["eval/return"] for e in r["evals"] if e["env_steps"] <= prof["method_steps"]][-3:])
             for r in experts if r["task"] == task]
        return float(np.mean(v)) if v else float("nan")

    refs = {task: dict(expert=float(np.mean([data[k]["expert_best_return"] for k in data if k[0] == task] or [np.nan])),
                       ppo_true_reward_same_steps=true_reward_at_method_steps(task),
                       demos=float(np.mean([data[k]["demo_mean_return"] for k in data if k[0] == task] or [np.nan])),
                       random=float(np.mean([data[k]["random_return"] for k in data if k[0] == task] or [np.nan])))
            for task in prof["tasks"]}
    return dict(table=table, verdict=verdict, wall_clock=wall, references=refs)


def _mean_curve(curves):
    """Average curves [[x, y], ...] over seeds, truncated to the shortest (same schedule in every seed)."""
    curves = [np.asarray(c, dtype=float) for c in curves if len(c)]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], axis=0)


def plot(result, prof, path):
    """Row 1: true return vs preference pairs (mean +- 95% CI over seeds) with expert / demonstration /
    random lines. Rows 2-3: learning curves (true return, and corr(r_theta, r) on each PPO batch) vs env
    steps, mean over seeds, for irl and for rlhf/aihf at the smallest and largest non-zero budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = prof["tasks"]
    fig, axes = plt.subplots(3, len(tasks), figsize=(5.5 * len(tasks), 11), squeeze=False)
    xs = list(range(len(prof["budgets"])))
    runs = [r for r in result["records"] if r.get("kind") == "run"]
    nonzero = [b for b in prof["budgets"] if b > 0]
    curve_sets = [("irl", 0)] + [(m, b) for b in sorted({nonzero[0], nonzero[-1]}) for m in ("rlhf", "aihf")] if nonzero else []
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        for m in [*METHODS, *POSTHOC]:
            rows = {r["budget"]: r for r in result["analysis"]["table"] if r["task"] == task and r["method"] == m}
            pts = [(x, rows[b]) for x, b in zip(xs, prof["budgets"]) if b in rows]
            if pts:
                x = [p[0] for p in pts]
                y = np.array([p[1]["mean"] for p in pts])
                c = np.nan_to_num(np.array([p[1]["ci95"] for p in pts]))
                ax.plot(x, y, marker="s" if m in POSTHOC else "o", label=m + (" (post hoc)" if m in POSTHOC else ""),
                        lw=2.5 if m == "aihf" else 1.2, ls=":" if m in POSTHOC else "-")
                ax.fill_between(x, y - c, y + c, alpha=0.15)
        ref = result["analysis"]["references"][task]
        for k, ls, label in (("expert", "-", "expert (best snapshot)"), ("demos", "--", "demonstrations"),
                             ("ppo_true_reward_same_steps", "-.", "PPO on the true reward, same steps"),
                             ("random", ":", "random")):
            for a in (ax, axes[1][col]):
                if k in ref:
                    a.axhline(ref[k], color="k", ls=ls, lw=0.8, label=label if a is ax else None)
        ax.set_xticks(xs, [str(b) for b in prof["budgets"]])
        ax.set_xlabel("preference pairs")
        ax.set_ylabel("true return (last 3 evaluations)")
        ax.set_title(task)
        ax.legend(fontsize=7)
        w = max(1, prof["eval_every"])
        for m, b in curve_sets:
            sel = [r for r in runs if r["task"] == task and r["method"] == m and r["budget"] == b]
            label = f"{m} {b} pairs" if m != "irl" else "irl"
            ret = _mean_curve([[[e["env_steps"], e["eval/return"]] for e in r["evals"]] for r in sel])
            if ret is not None:
                axes[1][col].plot(ret[:, 0], ret[:, 1], label=label)
            cor = _mean_curve([r.get("reward_corr", []) for r in sel])
            if cor is not None:  # smooth per-batch correlations over evaluation windows
                k = len(cor) // w * w
                if k:
                    cw = cor[:k].reshape(-1, w, 2).mean(1)
                    axes[2][col].plot(cw[:, 0], cw[:, 1], label=label)
        axes[1][col].set_ylabel("true return (deterministic policy)")
        axes[2][col].set_ylabel("corr(learned reward, true reward)")
        for a in (axes[1][col], axes[2][col]):
            a.set_xlabel("env steps")
            a.legend(fontsize=7)
    made = result.get("records_made_by")
    commits = (f"runs by commits {', '.join(str(m['commit'])[:8] for m in made)}; analysis commit "
               if made else "commit ") + str(result["commit"])[:10]
    fig.suptitle(f"{result['device']} {commits}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="small")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the profile's seeds")
    ap.add_argument("--posthoc", action="store_true", help="also irl/rlhf/aihf with a BC-initialised actor "
                    "(smallest budget), chosen after the main results were seen and labelled so")
    ap.add_argument("--analyse-only", action="store_true",
                    help="run nothing: analyse the records in --work (e.g. made on another machine)")
    ap.add_argument("--device", default=None, help="where the records were made (default: this CPU)")
    ap.add_argument("--made-by", nargs="+", default=[], metavar="JSON",
                    help="with --analyse-only: the result files of the invocations that made the records "
                         "(their device, versions, commit and command are kept)")
    ap.add_argument("--reanalyse", metavar="JSON", default=None,
                    help="run nothing: analyse again the records kept in an earlier result file (e.g. a committed "
                         "one, after the analysis changed); its profile and makers are kept")
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args(argv)
    old = None
    if a.reanalyse:
        with open(a.reanalyse) as f:
            old = json.load(f)
        if old.get("benchmark") != "bench_alignment_control" or "records" not in old:
            raise SystemExit(f"--reanalyse: {a.reanalyse} is not a bench_alignment_control result with records")
        a.profile = old.get("profile", a.profile)  # names the output like the original
    prof = dict(PROFILES[a.profile], **({"seeds": a.seeds} if a.seeds else {}), posthoc=a.posthoc)
    work = a.work or str(ROOT / "runs" / f"bench_alignment_control_{a.profile}")
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_alignment_control_{a.profile}.json")
    if a.fresh:
        shutil.rmtree(work, ignore_errors=True)
    head = commit()
    t0 = time.time()
    rec_dir = os.path.join(work, "records")
    keep = ("device", "versions", "commit", "command", "wall_seconds_this_invocation", "profile_config")
    made_by = [{k: json.load(open(f)).get(k) for k in keep} for f in a.made_by]
    if old is not None:
        prof, made_by = old["profile_config"], old.get("records_made_by") or [{k: old.get(k) for k in keep}]
        records = dict(enumerate(old["records"]))
        a.device = a.device or old.get("device")
    elif a.analyse_only:
        missing = [j["key"] for j in plan(prof) if not os.path.isfile(os.path.join(rec_dir, j["key"] + ".json"))]
        if missing:
            raise SystemExit(f"--analyse-only: {len(missing)} records missing in {rec_dir}, e.g. {missing[:3]}")
    if not a.reanalyse:
        records = run_jobs(plan(prof), run_job, (prof, work), rec_dir, a.workers or prof["workers"], _init_worker,
                           (a.threads,))
    analysis = analyse(records, prof)
    result = dict(benchmark="bench_alignment_control", profile=a.profile, profile_config=prof,
                  device=a.device or cpu_name(),
                  versions=versions("mujoco", "gymnasium"), commit=head, wall_seconds_this_invocation=time.time() - t0, analysis=analysis,
                  records=list(records.values()),
                  command="python benchmarks/bench_alignment_control.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if made_by and not (a.analyse_only or a.reanalyse):  # this invocation made records too
        made_by = [*made_by, {k: result.get(k) for k in keep}]
    if made_by:
        result["records_made_by"] = made_by
        result["versions"] = dict(analysis=result["versions"], runs=[m["versions"] for m in result["records_made_by"]])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    plot(result, prof, out[:-5] + ".png" if out.endswith(".json") else out + ".png")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for r in analysis["table"]:
        print(f"{r['task']:<18} {r['method']:<7} {r['budget']:>5} pairs: {r['mean']:8.1f} +- {r['ci95']:.1f}")
    for v in analysis["verdict"]:
        print(f"verdict {v['task']} {v['budget']:>5} pairs ({v['variant']}): aihf {v['aihf']:.1f} vs rlhf "
              f"{v['rlhf']:.1f} (diff {v['diff']:+.1f} +- {v['diff_ci95']:.1f})")
    print(f"wall-clock per 100k env steps: {analysis['wall_clock']}")
    print(f"[bench] wrote {out}")
    return result


if __name__ == "__main__":
    main()
