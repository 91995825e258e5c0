"""Demonstrations and segment preferences from an expert's training run (``method=expert``), reproducible
from a seed and saved with their metadata.

    demonstrations  ``num_demos`` episodes of the snapshot whose evaluated return is closest to
                    ``demo_quality`` x the best snapshot's (imperfect on purpose), deterministic or
                    with Gaussian action noise of std ``action_noise``
    preferences     ``num_pairs`` pairs of ``segment_len``-step segments from a pool of policies
                    (every snapshot, plus uniformly random actions), labelled by a Bradley-Terry draw
                    on their true segment returns (``temperature``, ``label_noise``)

Files in out_dir: demos.npz, prefs.npz (nested: the first m pairs are the same for any larger
num_pairs), data.json (which snapshot, returns of expert / demonstrator / random).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from ...envs import MLPPolicy, make_vec
from ..options import ConfigError
from .data import Trajectories, first_episodes, sample_segment_pairs


def load_snapshots(expert_dir: str) -> list[dict]:
    """The expert run's policy snapshots, by training iteration."""
    files = glob.glob(os.path.join(expert_dir, "policies", "iter*.pt"))
    if not files:
        raise ConfigError(f"expert_dir {expert_dir!r}: no policies/iter*.pt (run method=expert there first)")
    snaps = []
    for f in files:
        try:
            snap = torch.load(f, weights_only=False)
            snap["iter"], snap["eval_return"], snap["policy"], snap["stochastic"]
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
            raise ConfigError(f"expert_dir {expert_dir!r}: snapshot {f} cannot be read ({type(e).__name__}); "
                              "delete it or re-run the expert") from e
        snaps.append(snap)
    return sorted(snaps, key=lambda s: s["iter"])


def _episodes(task: str, policy: MLPPolicy | None, n: int, seed: int, max_steps: int) -> Trajectories:
    """n complete episodes of policy (None: uniform random actions) in fresh envs of task."""
    envs = make_vec(task, num_envs=min(n, 64), num_threads=min(n, 64, os.cpu_count() or 1))
    try:
        return first_episodes(envs, policy, n, max_steps, seed)
    finally:
        envs.close()


def make_data(expert_dir: str, out_dir: str, *, num_demos: int = 10, demo_quality: float = 0.7,
              action_noise: float = 0.0, num_pairs: int = 1000, segment_len: int = 50, temperature: float = 1.0,
              label_noise: float = 0.0, pool_episodes: int = 8, seed: int = 0) -> dict:
    """Write demos.npz, prefs.npz and data.json (module docstring); returns the metadata."""
    if num_demos < 1 or num_pairs < 0 or segment_len < 1 or pool_episodes < 1:
        raise ConfigError("need num_demos >= 1, num_pairs >= 0, segment_len >= 1, pool_episodes >= 1")
    if not 0 < demo_quality <= 1 or action_noise < 0:
        raise ConfigError(f"need 0 < demo_quality <= 1 and action_noise >= 0, got {demo_quality}, {action_noise}")
    try:
        with open(os.path.join(expert_dir, "config.json")) as f:
            task = json.load(f)["task"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"expert_dir {expert_dir!r}: config.json is missing or not a control run's "
                          f"({type(e).__name__})") from e
    snaps = load_snapshots(expert_dir)
    import gymnasium

    max_steps = gymnasium.spec(task).max_episode_steps or 1000
    best = max(s["eval_return"] for s in snaps)
    random_ret = float(_episodes(task, None, 4, seed + 7, max_steps).episode_returns().mean())
    target = random_ret + demo_quality * (best - random_ret)
    demo_snap = min(snaps, key=lambda s: abs(s["eval_return"] - target))
    spec = dict(demo_snap["stochastic" if action_noise > 0 else "policy"])
    if action_noise > 0:
        spec["log_std"] = np.full(len(spec["biases"][-1]), np.log(action_noise), np.float32)
    demos = _episodes(task, MLPPolicy(**spec), num_demos, seed, max_steps)
    demos.meta = dict(task=task, snapshot_iter=demo_snap["iter"], snapshot_eval_return=demo_snap["eval_return"],
                      action_noise=action_noise, seed=seed)
    pools = [_episodes(task, MLPPolicy(**s["stochastic"]), pool_episodes, seed + 100 + i, max_steps)
             for i, s in enumerate(snaps)]
    pools.append(_episodes(task, None, pool_episodes, seed + 99, max_steps))
    long_enough = [p for p in pools if any(b - a >= segment_len for a, b in p.episode_bounds())]
    if not long_enough:
        raise ConfigError(f"segment_len={segment_len}: no policy in the pool has an episode that long")
    prefs = sample_segment_pairs(long_enough, num_pairs, segment_len, np.random.default_rng(seed + 1),
                                 temperature, label_noise, meta=dict(task=task, seed=seed, pool_policies=len(long_enough)))
    os.makedirs(out_dir, exist_ok=True)
    demos.save(os.path.join(out_dir, "demos.npz"))
    prefs.save(os.path.join(out_dir, "prefs.npz"))
    meta = dict(task=task, expert_dir=expert_dir, seed=seed, expert_best_return=best, random_return=random_ret,
                demo_snapshot_iter=demo_snap["iter"], demo_snapshot_eval_return=demo_snap["eval_return"],
                demo_mean_return=float(demos.episode_returns().mean()), num_demos=num_demos,
                demo_transitions=len(demos), action_noise=action_noise, num_pairs=num_pairs, segment_len=segment_len,
                temperature=temperature, label_noise=label_noise,
                label_agreement=float(np.mean((prefs.true_returns[:, 0] > prefs.true_returns[:, 1]) == prefs.first_preferred))
                if num_pairs else None)
    with open(os.path.join(out_dir, "data.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
