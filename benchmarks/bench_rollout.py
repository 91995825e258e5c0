"""Env-steps per second of gymnasium's MuJoCo tasks, side by side in one run:

  aihf_step               aihf_fast.envs.make_vec(...).step() loop, random actions
  aihf_rollout_open_loop  rollout(actions=...): the same steps without returning to Python
  aihf_rollout_mlp        rollout(MLPPolicy): an MLP actor (two 256-unit ReLU layers) in C++
  aihf_step_torch_mlp     the step loop driven by the same MLP in PyTorch
  gym_sync / gym_async    gymnasium.make_vec(..., vectorization_mode="sync" / "async")
  envpool                 EnvPool (own bundled MuJoCo and XML: not the same task), separate process
  mujoco_batch            mujoco.batch.Batch stepping raw physics (no task, no resets)
  physics_limit           benchmarks/physics_limit.c replaying recorded episodes with MuJoCo's
                          own calls only, envs split over pthreads

for num_envs x threads. JSON (device, versions, commit, every measurement) and a PNG go to
benchmarks/results/. Ratios for the issue's target (Hopper-v5, 64 envs, 2 threads) are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit, versions  # noqa: E402


def random_actions(space, n, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(space.low, space.high, size=(T, n, space.shape[0])).astype(np.float32)


def actor(obs_dim, nu):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(obs_dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, nu))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net


def timed(fn, steps):
    t = time.perf_counter()
    fn()
    return steps / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- providers


def p_aihf_step(task, n, threads, T):
    from aihf_fast.envs import make_vec

    env = make_vec(task, n, num_threads=threads, copy=False)
    env.reset(seed=0)
    acts = random_actions(env.single_action_space, n, T)

    def run():
        for t in range(T):
            env.step(acts[t])

    env.step(acts[0])
    return timed(run, n * T)


def p_aihf_rollout_open_loop(task, n, threads, T):
    from aihf_fast.envs import make_vec

    env = make_vec(task, n, num_threads=threads)
    env.reset(seed=0)
    acts = random_actions(env.single_action_space, n, T)
    return timed(lambda: env.rollout(actions=acts, num_steps=T), n * T)


def p_aihf_rollout_mlp(task, n, threads, T):
    from aihf_fast.envs import MLPPolicy, make_vec

    env = make_vec(task, n, num_threads=threads)
    env.reset(seed=0)
    pol = MLPPolicy.from_torch(actor(env.single_observation_space.shape[0], env.single_action_space.shape[0]),
                               activation="relu", squash="tanh")
    return timed(lambda: env.rollout(pol, T), n * T)


def p_aihf_step_torch_mlp(task, n, threads, T):
    import torch

    from aihf_fast.envs import make_vec

    torch.set_num_threads(threads)
    env = make_vec(task, n, num_threads=threads, copy=False)
    obs, _ = env.reset(seed=0)
    net = actor(env.single_observation_space.shape[0], env.single_action_space.shape[0])
    low = torch.as_tensor(env.single_action_space.low)
    high = torch.as_tensor(env.single_action_space.high)

    def run():
        o = obs
        for _ in range(T):
            with torch.no_grad():
                u = torch.tanh(net(torch.as_tensor(o, dtype=torch.float32)))
                a = (low + (u + 1) * 0.5 * (high - low)).numpy()
            o = env.step(a)[0]

    return timed(run, n * T)


def p_gym(mode):
    def run_gym(task, n, threads, T):
        import gymnasium as gym

        if mode == "async" and n > 16:
            raise RuntimeError("skipped: one process per env")
        env = gym.make_vec(task, n, vectorization_mode=mode)
        env.reset(seed=0)
        T = max(20, min(T, 20000 // n))
        acts = random_actions(env.single_action_space, n, T)

        def run():
            for t in range(T):
                env.step(acts[t])

        r = timed(run, n * T)
        env.close()
        return r

    return run_gym


ENVPOOL_SCRIPT = r"""
import sys, time, numpy as np, envpool
task, n, threads, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
env = envpool.make(task, env_type="gymnasium", num_envs=n, batch_size=n, num_threads=threads, seed=0)
env.reset()
sp = env.action_space
acts = np.random.default_rng(0).uniform(sp.low, sp.high, size=(T, n, sp.shape[0]))
env.step(acts[0])
t = time.perf_counter()
for k in range(T):
    env.step(acts[k])
print(n * T / (time.perf_counter() - t))
"""


def p_envpool(task, n, threads, T):
    out = subprocess.run([sys.executable, "-c", ENVPOOL_SCRIPT, task, str(n), str(threads), str(T)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "envpool failed")
    return float(out.stdout.strip().splitlines()[-1])


def _model(task):
    from aihf_fast.envs.reference import Reference

    return Reference(task, {}).model_path


def p_mujoco_batch(task, n, threads, T):
    import mujoco
    from mujoco import batch

    from aihf_fast.envs import make_vec

    env = make_vec(task, 1)
    fs = int(round(env._core.dt / mujoco.MjModel.from_xml_path(_model(task)).opt.timestep))
    m = mujoco.MjModel.from_xml_path(_model(task))
    b = batch.Batch(m, n, nthread=threads, persistent=True)
    ctrl = b.bind("ctrl")
    acts = random_actions(env.single_action_space, n, T)

    def run():
        for t in range(T):
            ctrl[:] = acts[t]
            b.step(nstep=fs)

    return timed(run, n * T)


_PHYS = {}


def p_physics_limit(task, n, threads, T):
    import mujoco

    from aihf_fast.envs import make_vec

    mj_dir = os.path.dirname(mujoco.__file__)
    exe = _PHYS.get("exe")
    if exe is None:
        exe = os.path.join(tempfile.mkdtemp(), "physics_limit")
        lib = next(f for f in os.listdir(mj_dir) if f.startswith("libmujoco.so."))
        subprocess.run(["cc", "-O3", str(ROOT / "benchmarks" / "physics_limit.c"), f"-I{mj_dir}/include",
                        os.path.join(mj_dir, lib), f"-Wl,-rpath,{mj_dir}", "-lpthread", "-o", exe], check=True)
        _PHYS["exe"] = exe
    key = (task, n, T)
    if key not in _PHYS:  # record the episodes once: initial states at episode starts + actions
        env = make_vec(task, n, num_threads=threads)
        env.reset(seed=0)
        acts = random_actions(env.single_action_space, n, T)
        rec = env.rollout(actions=acts, num_steps=T, record_state=True)
        done = rec["terminated"] | rec["truncated"]
        start = np.zeros((T, n), np.uint8)
        start[0] = 1
        start[1:] = done[:-1]
        d = tempfile.mkdtemp()
        for name, arr in (("start", start), ("qpos", rec["qpos"]), ("qvel", rec["qvel"]), ("act", acts.astype(np.float64))):
            np.ascontiguousarray(np.swapaxes(arr, 0, 1)).tofile(os.path.join(d, f"{name}.bin"))
        _PHYS[key] = (d, env._core.nq, env._core.nv, env._core.nu,
                      int(round(env._core.dt / mujoco.MjModel.from_xml_path(_model(task)).opt.timestep)))
    d, nq, nv, nu, fs = _PHYS[key]
    out = subprocess.run([exe, _model(task), d, str(n), str(T), str(nq), str(nv), str(nu), str(fs), str(threads)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


PROVIDERS = {
    "aihf_step": p_aihf_step,
    "aihf_rollout_open_loop": p_aihf_rollout_open_loop,
    "aihf_rollout_mlp": p_aihf_rollout_mlp,
    "aihf_step_torch_mlp": p_aihf_step_torch_mlp,
    "gym_sync": p_gym("sync"),
    "gym_async": p_gym("async"),
    "envpool": p_envpool,
    "mujoco_batch": p_mujoco_batch,
    "physics_limit": p_physics_limit,
}
THREADLESS = {"gym_sync"}  # one Python loop whatever the thread count


def main(argv=None):
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["Hopper-v5"])
    p.add_argument("--num-envs", type=ints, default=[1, 16, 64, 256])
    p.add_argument("--threads", type=ints, default=sorted({1, 2, len(os.sched_getaffinity(0))}))
    p.add_argument("--env-steps", type=int, default=20000, help="env steps per measurement (T = this / num_envs)")
    p.add_argument("--providers", type=lambda s: s.split(","), default=list(PROVIDERS))
    p.add_argument("--repeats", type=int, default=3, help="rounds over the providers; best of them is reported")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_rollout_cpu.json"))
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    report = {"benchmark": "bench_rollout", "device": f"{platform.processor() or 'cpu'}, {len(os.sched_getaffinity(0))} CPUs",
              "versions": versions("mujoco", "gymnasium", "envpool"), "commit": commit(), "argv": sys.argv[1:], "results": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in a.tasks:
        for n in a.num_envs:
            T = max(50, a.env_steps // n)
            for threads in a.threads:
                names = [m for m in a.providers if not (m in THREADLESS and threads != a.threads[0])]
                rows = {m: {"task": task, "provider": m, "num_envs": n, "threads": threads, "T": T, "runs": []}
                        for m in names}
                # providers round-robin, a.repeats rounds: machine noise hits all of them alike
                for _ in range(a.repeats):
                    for m in names:
                        row = rows[m]
                        if row.get("status", "ok") != "ok":
                            continue
                        try:
                            row["runs"].append(PROVIDERS[m](task, n, threads, T))
                            row["status"] = "ok"
                        except Exception as e:  # record and go on
                            row["status"] = f"{type(e).__name__}: {str(e)[:200]}"
                for m in names:
                    row = rows[m]
                    if row["runs"]:
                        row["env_steps_per_s"] = max(row["runs"])  # best of the rounds
                        row["median_env_steps_per_s"] = float(np.median(row["runs"]))
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
                out.write_text(json.dumps(report, indent=1))
    report["ratios"] = ratios(report["results"])
    print(json.dumps(report["ratios"], indent=1))
    out.write_text(json.dumps(report, indent=1))
    if a.plot:
        plot(report, out.with_suffix(".png"))


def ratios(rows, task="Hopper-v5", n=64, threads=2):
    def rate(provider, th=threads):
        for r in rows:
            if (r["task"], r["provider"], r["num_envs"], r["threads"]) == (task, provider, n, th) and r["status"] == "ok":
                return r["env_steps_per_s"]
        return None

    gym_sync = next((r["env_steps_per_s"] for r in rows if (r["task"], r["provider"], r["num_envs"]) ==
                     (task, "gym_sync", n) and r["status"] == "ok"), None)
    step = rate("aihf_step")
    div = lambda a, b: (a / b) if (a and b) else None  # noqa: E731
    return {
        "config": f"{task}, {n} envs, {threads} threads, random actions",
        "step_over_physics_limit": div(step, rate("physics_limit")),
        "step_over_envpool": div(step, rate("envpool")),
        "step_over_gym_sync": div(step, gym_sync),
        "rollout_mlp_over_step_torch_mlp": div(rate("aihf_rollout_mlp"), rate("aihf_step_torch_mlp")),
        "rollout_open_loop_over_physics_limit": div(rate("aihf_rollout_open_loop"), rate("physics_limit")),
        "targets": {"step_over_physics_limit": 0.9, "step_over_envpool": 1.25, "step_over_gym_sync": 4.0,
                    "rollout_mlp_over_step_torch_mlp": 1.5},
    }


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["status"] == "ok"]
    tasks = sorted({r["task"] for r in rows})
    if not rows:
        return
    th = max(r["threads"] for r in rows)
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for j, task in enumerate(tasks):
        ax = axes[0, j]
        for name in PROVIDERS:
            rs = sorted((r for r in rows if r["task"] == task and r["provider"] == name and
                         (r["threads"] == th or name in THREADLESS)), key=lambda r: r["num_envs"])
            if rs:
                ax.plot([r["num_envs"] for r in rs], [r["env_steps_per_s"] for r in rs], "o-", label=name)
        ax.set(title=f"{task}, {th} threads", xlabel="num_envs", ylabel="env-steps/s", xscale="log", yscale="log")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['device']} (commit {str(report['commit'])[:8]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
