"""Initial states of each task, drawn exactly as gymnasium 1.4's ``reset_model`` draws them.

Each function takes the env's own numpy Generator (seeded as gymnasium seeds it) and returns
(qpos, qvel) float64, consuming the same random numbers in the same order; the C++ side then
does mj_resetData, sets them and runs mj_forward, as ``MujocoEnv.set_state`` does.
"""
from __future__ import annotations

import numpy as np


def _uniform_both(scale):
    def draw(rng: np.random.Generator, qpos0, qvel0):
        qpos = qpos0 + rng.uniform(low=-scale, high=scale, size=qpos0.size)
        qvel = qvel0 + rng.uniform(low=-scale, high=scale, size=qvel0.size)
        return qpos, qvel

    return draw


def _uniform_then_normal(scale):
    def draw(rng: np.random.Generator, qpos0, qvel0):
        qpos = qpos0 + rng.uniform(low=-scale, high=scale, size=qpos0.size)
        qvel = qvel0 + scale * rng.standard_normal(qvel0.size)
        return qpos, qvel

    return draw


def _reacher(scale):
    def draw(rng: np.random.Generator, qpos0, qvel0):
        qpos = rng.uniform(low=-0.1, high=0.1, size=qpos0.size) + qpos0
        while True:
            goal = rng.uniform(low=-0.2, high=0.2, size=2)
            if np.linalg.norm(goal) < 0.2:
                break
        qpos[-2:] = goal
        qvel = qvel0 + rng.uniform(low=-0.005, high=0.005, size=qvel0.size)
        qvel[-2:] = 0
        return qpos, qvel

    return draw


def _pusher(scale):
    def draw(rng: np.random.Generator, qpos0, qvel0):
        qpos = qpos0.copy()
        goal_pos = np.asarray([0, 0])
        while True:
            cylinder_pos = np.concatenate([rng.uniform(low=-0.3, high=0, size=1), rng.uniform(low=-0.2, high=0.2, size=1)])
            if np.linalg.norm(cylinder_pos - goal_pos) > 0.17:
                break
        qpos[-4:-2] = cylinder_pos
        qpos[-2:] = goal_pos
        qvel = qvel0 + rng.uniform(low=-0.005, high=0.005, size=qvel0.size)
        qvel[-4:] = 0
        return qpos, qvel

    return draw


def _normal_times_scale(scale):  # InvertedDoublePendulum: standard_normal(nv) * scale
    def draw(rng: np.random.Generator, qpos0, qvel0):
        qpos = qpos0 + rng.uniform(low=-scale, high=scale, size=qpos0.size)
        qvel = qvel0 + rng.standard_normal(qvel0.size) * scale
        return qpos, qvel

    return draw


# task -> (reset_noise_scale -> draw(rng, qpos0, qvel0)); Reacher and Pusher have no noise option
RESET_STATE = {
    "Hopper-v5": _uniform_both,
    "Walker2d-v5": _uniform_both,
    "Swimmer-v5": _uniform_both,
    "InvertedPendulum-v5": _uniform_both,
    "HalfCheetah-v5": _uniform_then_normal,
    "Ant-v5": _uniform_then_normal,
    "Reacher-v5": _reacher,
    "Humanoid-v5": _uniform_both,
    "HumanoidStandup-v5": _uniform_both,
    "InvertedDoublePendulum-v5": _normal_times_scale,
    "Pusher-v5": _pusher,
}
