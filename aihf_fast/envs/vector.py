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

from .policy import MLPPolicy
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
    truncations (num_envs,) bool. As in gymnasium, ``copy=False`` returns the observations
    without a copy: a view of the C++ buffer, overwritten by the next call (``torch.from_numpy``
    of it is a zero-copy tensor); the other arrays are always fresh.
    ``info`` is gymnasium's vector info: the task's step / reset info keys (``x_position``,
    ``reward_ctrl``, ...) with their ``_key`` masks, ``final_obs``/``final_info`` in SAME_STEP
    mode, plus ``diverged`` when MuJoCo's own checks reset an env's data during the step (NaN or
    huge qpos/qvel/qacc, as happens under gymnasium too).
    """

    def __init__(
        self,
        task: str,
        num_envs: int,
        num_threads: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        max_episode_steps: int | None = None,
        copy: bool = True,
        reset_queue: int = 32,
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
                                   int(max_episode_steps), int(reset_queue))
        # NumPy views of the C++ buffers, made once: the buffers never move, and building a view
        # on every property access would cost the step loop a dozen allocations per call
        self._buf = _Buffers(self._core)
        self._info_keys = list(self._core.info_keys)
        self._reset_info_keys = list(self._core.reset_info_keys)
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
        self._autoreset_mode = autoreset_mode
        self._needs_reset = np.ones(self.num_envs, dtype=bool)  # DISABLED mode bookkeeping
        self._was_reset = np.zeros(self.num_envs, dtype=bool)  # step() before reset() is an error
        self._check_done = True  # DISABLED: refuse to step ended envs (the single-env face allows it)
        self._closed = False

    # ------------------------------------------------------------------ RNG and reset states

    @property
    def np_random_generators(self) -> list[np.random.Generator | None]:
        """Each sub-env's Generator (a few reset states ahead of gymnasium's: see reset_queue)."""
        return list(self._rngs)

    def _fill_queues(self, envs=None) -> None:
        """Top up each env's reset queue with states drawn from its own Generator, in order."""
        core = self._core
        K = core.reset_queue
        count, head = self._buf.queue_count, self._buf.queue_head
        envs = np.flatnonzero(count < K) if envs is None else envs
        qpos, qvel = self._buf.queue_qpos, self._buf.queue_qvel
        for i in envs:
            if self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(None)
            while count[i] < K:
                slot = (head[i] + count[i]) % K
                qpos[i, slot], qvel[i, slot] = self._draw(self._rngs[i], self._qpos0.copy(), self._qvel0.copy())
                count[i] += 1

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
            if seeds[i] is not None:  # a new seed drops the states drawn from the old Generator
                self._rngs[i], _ = seeding.np_random(int(seeds[i]))
                self._buf.queue_count[i] = 0
        self._fill_queues()
        self._core.reset(np.ascontiguousarray(mask))
        self._fill_queues()
        self._needs_reset[mask] = False
        self._was_reset |= mask
        none = np.zeros(self.num_envs, dtype=bool)
        return self._out(self._buf.obs), self._infos(none, mask, np.float32)

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
        self._check_was_reset()
        if self._autoreset_mode == AutoresetMode.DISABLED and self._check_done and self._needs_reset.any():
            raise ValueError(
                f"envs {np.flatnonzero(self._needs_reset).tolist()} ended or were never reset; with "
                "autoreset_mode=DISABLED call reset(options={'reset_mask': mask}) before stepping them"
            )
        self._core.step(np.ascontiguousarray(a))
        self._fill_queues()
        term, trunc = self._buf.terminated, self._buf.truncated
        mode = self._autoreset_mode
        if mode == AutoresetMode.NEXT_STEP:  # an env either stepped or (auto)reset
            reset = self._buf.reset_consumed.copy()
        elif mode == AutoresetMode.SAME_STEP:  # ended envs report their reset info, the step's goes to final_info
            reset = self._buf.final_valid.copy()
        else:
            reset = np.zeros(self.num_envs, dtype=bool)
        infos = self._infos(~reset, reset, a.dtype)
        if mode == AutoresetMode.SAME_STEP and reset.any():
            final_obs = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(reset):
                final_obs[i] = self._buf.final_obs[i].copy()
            infos.update(final_obs=final_obs, _final_obs=reset.copy(),
                         final_info=self._infos(reset, np.zeros_like(reset), a.dtype), _final_info=reset.copy())
        if self._buf.diverged.any():
            infos.update(diverged=self._buf.diverged.copy(), _diverged=self._buf.diverged.copy())
        if self._autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= term | trunc
        return self._out(self._buf.obs), self._buf.rewards.copy(), term.copy(), trunc.copy(), infos

    def _check_was_reset(self):
        if not self._was_reset.all():
            raise gymnasium.error.ResetNeeded(
                f"envs {np.flatnonzero(~self._was_reset).tolist()} were never reset: call reset() first")

    def _infos(self, step_mask, reset_mask, action_dtype) -> dict[str, Any]:
        """gymnasium's vector info dict: each key's values and its ``_key`` mask, with the dtype
        numpy gives the single-env value (reward_ctrl has the action's dtype)."""
        infos: dict[str, Any] = {}
        types = {0: np.float64, 1: np.dtype(action_dtype), 2: np.int64}
        step_keys = self._info_keys if step_mask.any() else []
        values, every = self._buf.info, step_mask.all()
        for j, (name, kind) in enumerate(step_keys):
            if every:  # the common case: one copy per key
                infos[name], infos["_" + name] = values[:, j].astype(types[kind]), np.ones(self.num_envs, bool)
                continue
            arr = np.zeros(self.num_envs, dtype=types[kind])
            arr[step_mask] = values[step_mask, j]
            infos[name], infos["_" + name] = arr, step_mask.copy()
        if reset_mask.any():
            for j, name in enumerate(self._reset_info_keys):
                if name not in infos:
                    infos[name], infos["_" + name] = np.zeros(self.num_envs), np.zeros(self.num_envs, dtype=bool)
                infos[name][reset_mask] = self._buf.reset_info[reset_mask, j]
                infos["_" + name] |= reset_mask
        return infos

    # ------------------------------------------------------------------ whole trajectories

    def rollout(self, policy: MLPPolicy | None = None, num_steps: int = 1000, *, actions=None,
                seed: int | None = None, record_state: bool = False) -> dict[str, np.ndarray]:
        """Run ``num_steps`` steps in every env without returning to Python per step.

        Actions come from ``policy`` (an :class:`MLPPolicy`, evaluated in C++; gaussian noise from
        per-env generators, reseeded with ``seed``: env i draws stream i) or from ``actions``
        (T, num_envs, nu) (open loop). Episodes that end are reset at once (SAME_STEP semantics)
        from each env's own seeded reset states; the envs are left where the rollout ends.
        Returns arrays indexed [t, env]: obs (observation the action was chosen on), actions
        (float32), rewards, terminated, truncated, next_obs (observation after the step; the final
        one when the episode ended), diverged, and qpos/qvel (state before the step) when
        ``record_state``.
        """
        self._check_open()
        self._check_was_reset()
        core = self._core
        T = int(num_steps)
        if T < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        N, nu, D = self.num_envs, core.nu, core.obs_dim
        if (policy is None) == (actions is None):
            raise ValueError("give exactly one of policy (an MLPPolicy) or actions (T, num_envs, nu)")
        core_policy, open_loop = None, None
        if policy is not None:
            if not isinstance(policy, MLPPolicy):
                raise TypeError(f"policy must be an aihf_fast.envs.MLPPolicy, got {type(policy).__name__}")
            core_policy = policy.to_core(_core(), self.single_action_space.low, self.single_action_space.high)
            if seed is not None:
                core.seed_policy_noise(int(seed))
        else:
            open_loop = np.asarray(actions)
            if open_loop.shape != (T, N, nu):
                raise ValueError(f"actions must have shape {(T, N, nu)}, got {open_loop.shape}")
            if not np.isfinite(open_loop).all():
                raise ValueError("actions must be finite")
            open_loop = np.ascontiguousarray(open_loop, dtype=np.float32)
        out = dict(
            obs=np.empty((T, N, D)), actions=np.empty((T, N, nu), np.float32), rewards=np.empty((T, N)),
            terminated=np.empty((T, N), bool), truncated=np.empty((T, N), bool), next_obs=np.empty((T, N, D)),
            diverged=np.empty((T, N), bool),
        )
        if record_state:
            out["qpos"], out["qvel"] = np.empty((T, N, core.nq)), np.empty((T, N, core.nv))
        progress = np.zeros(N, dtype=np.int32)
        self._fill_queues()
        while core.rollout(core_policy, open_loop, T, progress, out["obs"], out["actions"], out["rewards"],
                           out["terminated"], out["truncated"], out["next_obs"], out["diverged"],
                           out.get("qpos"), out.get("qvel")) < N:
            self._fill_queues()  # some env used up its reset queue
        self._fill_queues()
        ended = self._buf.needs_reset.copy()
        if ended.any():
            if self._autoreset_mode == AutoresetMode.SAME_STEP:
                core.reset(np.ascontiguousarray(ended))
                self._fill_queues()
        if self._autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset = ended  # the rollout reset every env that ended before its last step
        return out

    def set_state(self, env: int, qpos, qvel) -> np.ndarray:
        """Set sub-env ``env``'s joint positions (nq,) and velocities (nv,) (then mj_forward);
        returns its new observation. Its time-limit counter is unchanged."""
        self._check_open()
        qpos = np.ascontiguousarray(qpos, dtype=np.float64)
        qvel = np.ascontiguousarray(qvel, dtype=np.float64)
        if qpos.shape != (self._core.nq,) or qvel.shape != (self._core.nv,):
            raise ValueError(f"qpos must be ({self._core.nq},) and qvel ({self._core.nv},), got {qpos.shape}, {qvel.shape}")
        if not (np.isfinite(qpos).all() and np.isfinite(qvel).all()):
            raise ValueError("qpos and qvel must be finite")
        if not 0 <= env < self.num_envs:
            raise IndexError(f"env must be in [0, {self.num_envs}), got {env}")
        self._core.set_state(int(env), qpos, qvel)
        self._needs_reset[env] = False
        self._was_reset[env] = True
        return self._buf.obs[env].copy()

    def _out(self, a):
        return a.copy() if self.copy else a

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this BatchedMujocoVectorEnv is closed")

    def close_extras(self, **kwargs):
        self._closed = True
        self._core = self._buf = None

    @property
    def num_threads(self) -> int:
        return self._core.num_threads

    def __repr__(self) -> str:
        return f"BatchedMujocoVectorEnv({self.task}, num_envs={self.num_envs})"


class _Buffers:
    """The C++ env's buffers as NumPy views (each keeps the env alive)."""

    NAMES = ("obs", "rewards", "terminated", "truncated", "reset_consumed", "final_valid", "final_obs", "diverged",
             "info", "reset_info", "needs_reset", "queue_count", "queue_head", "queue_qpos", "queue_qvel")

    def __init__(self, core):
        for name in self.NAMES:
            setattr(self, name, getattr(core, name))


_XML = {
    "Hopper-v5": "hopper.xml", "Walker2d-v5": "walker2d_v5.xml", "HalfCheetah-v5": "half_cheetah.xml",
    "Swimmer-v5": "swimmer.xml", "InvertedPendulum-v5": "inverted_pendulum.xml", "Reacher-v5": "reacher.xml",
    "Ant-v5": "ant.xml",
}
