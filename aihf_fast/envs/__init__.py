"""Batched MuJoCo environments in C++: gymnasium's ``*-v5`` tasks, step for step.

    envs = aihf_fast.envs.make_vec("Hopper-v5", num_envs=64)   # a gymnasium VectorEnv
    obs, info = envs.reset(seed=0)
    obs, rew, term, trunc, info = envs.step(envs.action_space.sample())
"""
from __future__ import annotations

from typing import Any

from gymnasium.vector import AutoresetMode

from .policy import MLPPolicy
from .single import BatchedMujocoEnv
from .vector import BatchedMujocoVectorEnv, task_ids


def make_vec(task: str, num_envs: int = 1, num_threads: int | None = None,
             autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
             max_episode_steps: int | None = None, copy: bool = True,
             reset_queue: int = 32, **options: Any) -> BatchedMujocoVectorEnv:
    """A ``gymnasium.vector.VectorEnv`` of ``num_envs`` copies of ``task`` (a gymnasium id such as
    "Hopper-v5") stepped in C++ on ``num_threads`` threads (default: min(num_envs, CPUs)).
    ``options``: the keywords of gymnasium's constructor of the task (``ctrl_cost_weight``,
    ``xml_file``, ``frame_skip``, ``render_mode``, ...), as ``gymnasium.make_vec`` passes them."""
    return BatchedMujocoVectorEnv(task, num_envs, num_threads, autoreset_mode, max_episode_steps, copy, reset_queue,
                                  **options)


def make(task: str, max_episode_steps: int | None = None, **options: Any) -> BatchedMujocoEnv:
    """A single ``gymnasium.Env`` of ``task`` on the C++ core, as ``gymnasium.make(task, **options)``."""
    return BatchedMujocoEnv(task, max_episode_steps, **options)


__all__ = ["AutoresetMode", "BatchedMujocoEnv", "BatchedMujocoVectorEnv", "make", "MLPPolicy", "make_vec", "task_ids"]
