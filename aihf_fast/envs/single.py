"""``BatchedMujocoEnv``: the single-env ``gymnasium.Env`` face of one C++ environment."""
from __future__ import annotations

import gymnasium
import numpy as np

from .vector import BatchedMujocoVectorEnv


class BatchedMujocoEnv(gymnasium.Env):
    """gymnasium.make(task) semantics (TimeLimit included) on the C++ core; no autoreset."""

    metadata = {"render_modes": []}

    def __init__(self, task: str, max_episode_steps: int | None = None):
        self._vec = BatchedMujocoVectorEnv(task, 1, 1, autoreset_mode="Disabled", max_episode_steps=max_episode_steps)
        self._vec._check_done = False  # like gymnasium.make: stepping on after the end is the caller's choice
        self.spec = self._vec.spec
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self._vec.reset(seed=seed)
        return obs[0], _unbatch(info)

    def step(self, action):
        a = np.asarray(action)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {a.shape}")
        obs, rew, term, trunc, info = self._vec.step(a[None])
        return obs[0], float(rew[0]), bool(term[0]), bool(trunc[0]), _unbatch(info)

    def close(self):
        self._vec.close()


def _unbatch(info: dict) -> dict:
    return {k: v[0] for k, v in info.items() if not k.startswith("_") and info.get("_" + k, [False])[0]}
