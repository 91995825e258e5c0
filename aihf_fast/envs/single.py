"""``BatchedMujocoEnv``: the single-env ``gymnasium.Env`` face of one C++ environment."""
from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from .vector import BatchedMujocoVectorEnv


class BatchedMujocoEnv(gymnasium.Env):
    """``gymnasium.make(task, **options)`` semantics (TimeLimit included, no autoreset) on the
    C++ core: the same observations, rewards, terminations, truncations and infos, with the types
    gymnasium returns (``check_environments_match`` against ``gymnasium.make`` passes)."""

    def __init__(self, task: str, max_episode_steps: int | None = None, **options: Any):
        self._vec = BatchedMujocoVectorEnv(task, 1, 1, autoreset_mode="Disabled",
                                           max_episode_steps=max_episode_steps, **options)
        self._vec._check_done = False  # like gymnasium.make: stepping on after the end is the caller's choice
        self._ref = self._vec._ref
        self.spec = self._vec.spec
        self.metadata = self._ref.env.metadata
        self.render_mode = self._vec.render_mode
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space

    @property
    def dt(self) -> float:
        """Seconds of simulated time per step (timestep x frame_skip)."""
        return self._vec.dt

    @property
    def model(self):
        """The ``mujoco.MjModel`` of the task (see ``BatchedMujocoVectorEnv.model``)."""
        return self._vec.model

    @property
    def data(self):
        """A ``mujoco.MjData`` snapshot of the simulation (a copy made on each access)."""
        return self._vec.get_data(0)

    @property
    def diverged(self) -> bool:
        """Whether MuJoCo itself reset the simulation during the last step (NaN or huge state)."""
        return bool(self._vec.diverged[0])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self._vec.reset(seed=seed, options=options)
        # np_random is the generator the reset states are drawn from (a few resets ahead of
        # gymnasium's: the C++ side keeps a queue of them)
        self._np_random, self._np_random_seed = self._vec._rngs[0], self._vec._seeds[0]
        types = self._ref.reset_info_types
        return obs[0], {k: _as(types[k], v) for k, v in _unbatch(info).items()}

    def step(self, action):
        a = np.asarray(action)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {a.shape}")
        obs, rew, term, trunc, info = self._vec.step(a[None])
        types = self._ref.step_types(a.dtype)
        info = {k: _as(types.info[k], v) if k in types.info else v for k, v in _unbatch(info).items()}
        return obs[0], types.reward(rew[0]), bool(term[0]), bool(trunc[0]), info

    def render(self):
        return self._vec.render(0)

    def close(self):
        self._vec.close()


def _as(single_type, value):
    """value as gymnasium's env returns it: a Python/numpy scalar of its type, or an array copy."""
    return np.array(value) if single_type is np.ndarray else single_type(value)


def _unbatch(info: dict) -> dict:
    return {k: v[0] for k, v in info.items() if not k.startswith("_") and info.get("_" + k, [False])[0]}
