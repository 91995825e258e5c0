"""``BatchedMujocoVectorEnv``: gymnasium's MuJoCo tasks, N at a time in C++ (``aihf_fast._C``).

A ``gymnasium.vector.VectorEnv``: same spaces, ``reset(seed=)``, ``step()``, autoreset modes
(NEXT_STEP default, SAME_STEP, DISABLED) and, for a given seed and action sequence, the same
observations, rewards, terminations and truncations as
``gymnasium.make_vec(task, n, vectorization_mode="sync")``. Sub-env i is seeded with seed + i
and keeps its own numpy Generator, from which its reset states are drawn in Python exactly as
gymnasium draws them (one reset ahead, so the C++ loop never waits for Python); the stepping,
observations, rewards and time limits run in C++ on a thread pool with the GIL released.
"""
from __future__ import annotations

import os
from typing import Any

import gymnasium
import mujoco  # noqa: F401  (loads libmujoco.so.4.0.0 before the extension needs it)
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .resets import RESET_STATE

_MODES = {AutoresetMode.NEXT_STEP: 0, AutoresetMode.SAME_STEP: 1, AutoresetMode.DISABLED: 2}
ASSETS = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets")


def _core():
    try:
        from .. import _C
    except ImportError as e:  # pragma: no cover - a broken install
        raise ImportError(
            "aihf_fast._C (the C++ rollouts) is not built: reinstall with `pip install .`; "
            f"it links mujoco==4.0.0 from the mujoco wheel ({e})"
        ) from e
    return _C


def task_ids() -> list[str]:
    return list(_core().task_ids())


class BatchedMujocoVectorEnv(VectorEnv):
    """N copies of one gymnasium MuJoCo ``*-v5`` task stepped in C++ (see module docstring).

    Observations (num_envs, obs_dim) float64, rewards (num_envs,) float64, terminations and
    truncations (num_envs,) bool. The arrays returned by ``step``/``reset`` are copies unless
    ``copy=False``, in which case they are views of the C++ buffers, overwritten by the next call.
    ``info`` holds ``final_obs``/``final_info`` in SAME_STEP mode and ``diverged`` (a MuJoCo
    bad-acceleration warning during the step: MuJoCo reset that env's data, as it would under
    gymnasium) when any env diverged.
    """

    def __init__(
        self,
        task: str,
        num_envs: int,
        num_threads: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        max_episode_steps: int | None = None,
        copy: bool = True,
    ):
        core = _core()
        if task not in core.task_ids():
            raise ValueError(f"unknown task {task!r}; supported: {sorted(core.task_ids())}")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if num_threads is None:
            num_threads = min(int(num_envs), len(os.sched_getaffinity(0)))
        if not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
        autoreset_mode = AutoresetMode(autoreset_mode)
        spec = gymnasium.spec(task)
        if max_episode_steps is None:
            max_episode_steps = spec.max_episode_steps or 0
        xml = os.path.join(ASSETS, spec.kwargs.get("xml_file") or _XML[task])
        self._core = core.BatchEnv(task, xml, int(num_envs), int(num_threads), _MODES[autoreset_mode],
                                   int(max_episode_steps))
        self.task, self.num_envs, self.copy = task, int(num_envs), copy
        self.spec = spec
        self.metadata = {"autoreset_mode": autoreset_mode, "render_modes": []}
        self.render_mode = None
        lo, hi = np.asarray(self._core.ctrl_range, dtype=np.float64).reshape(-1, 2).astype(np.float32).T
        self.single_action_space = spaces.Box(low=lo, high=hi, dtype=np.float32)
        d = self._core.obs_dim
        self.single_observation_space = spaces.Box(-np.inf, np.inf, shape=(d,), dtype=np.float64)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._draw = RESET_STATE[task]
        self._qpos0 = np.asarray(self._core.qpos0, dtype=np.float64)
        self._qvel0 = np.zeros(self._core.nv)
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self._prepared = np.zeros(self.num_envs, dtype=bool)
        self._autoreset_mode = autoreset_mode
        self._needs_reset = np.ones(self.num_envs, dtype=bool)  # DISABLED mode bookkeeping
        self._closed = False

    # ------------------------------------------------------------------ RNG and reset states

    @property
    def np_random_generators(self) -> list[np.random.Generator | None]:
        """Each sub-env's Generator (one reset state ahead of gymnasium's)."""
        return list(self._rngs)

    def _prepare(self, envs) -> None:
        qpos, qvel = self._core.reset_qpos, self._core.reset_qvel
        for i in envs:
            if self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(None)
            qpos[i], qvel[i] = self._draw(self._rngs[i], self._qpos0.copy(), self._qvel0.copy())
            self._prepared[i] = True

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        self._check_open()
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed list must have num_envs={self.num_envs} entries, got {len(seeds)}")
        mask = np.ones(self.num_envs, dtype=bool)
        if options and "reset_mask" in options:
            mask = options["reset_mask"]
            if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
                raise ValueError(f"options['reset_mask'] must be a bool numpy array of shape ({self.num_envs},)")
            if not mask.any():
                raise ValueError("options['reset_mask'] must contain at least one True value")
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._rngs[i], _ = seeding.np_random(int(seeds[i]))
                self._prepared[i] = False
        self._prepare([i for i in np.flatnonzero(mask) if not self._prepared[i]])
        self._core.reset(np.ascontiguousarray(mask))
        self._prepared[mask] = False
        self._prepare(np.flatnonzero(mask))  # draw each env's next reset state now
        self._needs_reset[mask] = False
        return self._out(self._core.obs), {}

    # ------------------------------------------------------------------ step

    def step(self, actions):
        self._check_open()
        a = np.asarray(actions)
        if a.dtype not in (np.float32, np.float64):
            if not np.issubdtype(a.dtype, np.number):
                raise TypeError(f"actions must be a float32/float64 array, got dtype {a.dtype}")
            a = a.astype(np.float64)
        expected = (self.num_envs, self._core.nu)
        if a.shape != expected:
            raise ValueError(f"actions must have shape {expected}, got {a.shape}")
        if not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"actions must be finite; actions[{bad[0]}, {bad[1]}] = {a[tuple(bad)]}")
        if self._autoreset_mode == AutoresetMode.DISABLED and self._needs_reset.any():
            raise ValueError(
                f"envs {np.flatnonzero(self._needs_reset).tolist()} ended or were never reset; with "
                "autoreset_mode=DISABLED call reset(options={'reset_mask': mask}) before stepping them"
            )
        self._core.step(np.ascontiguousarray(a))
        consumed = self._core.reset_consumed
        if consumed.any():
            self._prepare(np.flatnonzero(consumed))
        term, trunc = self._core.terminated, self._core.truncated
        infos: dict[str, Any] = {}
        if self._autoreset_mode == AutoresetMode.SAME_STEP and self._core.final_valid.any():
            fv = self._core.final_valid.copy()
            final_obs = np.full(self.num_envs, None, dtype=object)
            final_info = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(fv):
                final_obs[i] = self._core.final_obs[i].copy()
                final_info[i] = {}
            infos.update(final_obs=final_obs, _final_obs=fv, final_info={}, _final_info=fv.copy())
        if self._core.diverged.any():
            infos.update(diverged=self._core.diverged.copy(), _diverged=self._core.diverged.copy())
        if self._autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= term | trunc
        return (self._out(self._core.obs), self._out(self._core.rewards), self._out(term), self._out(trunc), infos)

    def _out(self, a):
        return a.copy() if self.copy else a

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this BatchedMujocoVectorEnv is closed")

    def close_extras(self, **kwargs):
        self._closed = True
        self._core = None

    @property
    def num_threads(self) -> int:
        return self._core.num_threads

    def __repr__(self) -> str:
        return f"BatchedMujocoVectorEnv({self.task}, num_envs={self.num_envs})"


_XML = {
    "Hopper-v5": "hopper.xml", "Walker2d-v5": "walker2d_v5.xml", "HalfCheetah-v5": "half_cheetah.xml",
    "Swimmer-v5": "swimmer.xml", "InvertedPendulum-v5": "inverted_pendulum.xml", "Reacher-v5": "reacher.xml",
    "Ant-v5": "ant.xml",
}
