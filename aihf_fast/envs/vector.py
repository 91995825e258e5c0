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

import contextlib
import dataclasses
import math
import os
import threading
import warnings
from typing import Any

import gymnasium
import mujoco  # noqa: F401  (loads libmujoco.so.4.0.0 before the extension needs it)
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .policy import MLPPolicy
from .reference import Reference
from .resets import RESET_STATE

_MODES = {AutoresetMode.NEXT_STEP: 0, AutoresetMode.SAME_STEP: 1, AutoresetMode.DISABLED: 2}
# Actions: float16/32/64 go to the core as they are (float16 through float32, exactly); signed
# integers as float64 (numpy's control cost is the same while the squares sum exactly: |a| < 2**26).


def _core():
    try:
        from .. import _C
    except ImportError as e:  # pragma: no cover - a broken install
        raise ImportError(
            "aihf_fast._C (the C++ rollouts) is not built: reinstall with `pip install .`; "
            f"it links mujoco==4.0.0 from the mujoco wheel ({e})"
        ) from e
    global _NORM_SET
    if not _NORM_SET:
        _C.set_norm_order(NORM_ORDERS.index(numpy_norm_order()))
        _NORM_SET = True
    return _C


_NORM_SET = False


NORM_ORDERS = ("plain", "fma", "pairs")  # the C++ core's codes 0, 1, 2


def numpy_norm_order() -> str:
    """How ``np.linalg.norm`` of a short float64 vector sums its squares in this process, one of
    ``NORM_ORDERS``: OpenBLAS's ``ddot`` picks its kernel by CPU, and a plain multiply-add, an FMA
    chain and two accumulators (even and odd elements: SSE2 kernels) differ in the last bit.
    Measured on 24 vectors of 2 and 3 elements (the tasks' norms) where they differ, against exact
    arithmetic; warns if none of them is what numpy does."""
    from fractions import Fraction

    def sums(x):
        fma = plain = even = odd = 0.0
        for i, v in enumerate(x):
            fma = float(Fraction(v) ** 2 + Fraction(fma))  # one rounding per step
            plain += v * v
            if i % 2:
                odd += v * v
            else:
                even += v * v
        return dict(plain=plain, fma=fma, pairs=even + odd)

    rng = np.random.default_rng(0)
    hits, tried = dict.fromkeys(NORM_ORDERS, 0), 0
    while tried < 24:
        x = rng.normal(size=2 + tried % 2).tolist()
        roots = {k: math.sqrt(v) for k, v in sums(x).items()}
        if len(set(roots.values())) == 1:
            continue
        tried += 1
        got = float(np.linalg.norm(np.array(x)))
        for k, r in roots.items():
            hits[k] += r == got
    best = max(NORM_ORDERS, key=lambda k: (hits[k], k == "fma"))
    if hits[best] != tried:
        warnings.warn("np.linalg.norm sums a short vector's squares in none of the known orders here "
                      f"({hits} of {tried}): the tasks' norms (distance infos, Reacher's and Pusher's distance "
                      "rewards) may differ from gymnasium's in the last bit", RuntimeWarning, stacklevel=2)
    return best


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
    mode; each value has the dtype gymnasium's vector env gives it. ``diverged`` says which
    sub-envs MuJoCo's own checks reset during the last step (NaN or huge qpos/qvel/qacc, as
    happens under gymnasium too, silently); a MuJoCo error raises ``mujoco.FatalError``.

    ``**options`` are the keywords of gymnasium's constructor of ``task`` (``ctrl_cost_weight``,
    ``healthy_z_range``, ``xml_file``, ``frame_skip``, ``render_mode``, ...), with gymnasium's
    meaning and its own errors for bad values. One env object is used by one thread at a time: a
    call while another thread is inside one raises ``RuntimeError`` and changes nothing.
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
        **options: Any,
    ):
        self._lock = threading.Lock()
        self._closed = True  # until built
        core = _core()
        self._core_module = core
        if task not in core.task_ids():
            raise ValueError(f"unknown task {task!r}; supported: {sorted(core.task_ids())}")
        if not _is_int(num_envs) or not 1 <= num_envs < 2**31:
            raise ValueError(f"num_envs must be an int in [1, 2**31), got {num_envs!r}")
        if num_threads is None:
            num_threads = min(int(num_envs), len(os.sched_getaffinity(0)))
        if not _is_int(num_threads) or not 1 <= num_threads <= 1024:
            raise ValueError(f"num_threads must be an int in [1, 1024] or None, got {num_threads!r}")
        if not _is_int(reset_queue) or not 1 <= reset_queue <= 2**16:
            raise ValueError(f"reset_queue must be an int in [1, 65536], got {reset_queue!r}")
        autoreset_mode = AutoresetMode(autoreset_mode)
        if max_episode_steps is not None and (not _is_int(max_episode_steps) or not 1 <= max_episode_steps < 2**31):
            raise ValueError(f"max_episode_steps must be an int in [1, 2**31) or None (the task's own), got "
                             f"{max_episode_steps!r}")
        if options.get("render_mode") == "human":
            raise ValueError("render_mode='human' (a window) is not supported; use render_mode='rgb_array' and show "
                             "the frames yourself")
        self._ref = Reference(task, options)
        spec = self._ref.spec
        if max_episode_steps is None:
            max_episode_steps = spec.max_episode_steps or 0
        self._core = core.BatchEnv(task, self._ref.model_path, self._ref.core_options(), int(num_envs),
                                   int(num_threads), _MODES[autoreset_mode], int(max_episode_steps), int(reset_queue))
        ref_env = self._ref.env
        if self._core.obs_dim != ref_env.observation_space.shape[0] or self._core.nu != ref_env.action_space.shape[0]:
            raise ValueError(
                f"{self._ref.model_path} does not fit {task}: gymnasium builds observations of size "
                f"{ref_env.observation_space.shape[0]} and {ref_env.action_space.shape[0]} actions from it, the "
                f"C++ task {self._core.obs_dim} and {self._core.nu}")
        # NumPy views of the C++ buffers, made once: the buffers never move, and building a view
        # on every property access would cost the step loop a dozen allocations per call
        self._buf = _Buffers(self._core)
        self._info_keys = _columns(self._core.info_keys)  # (name, columns of the info buffer, is_array)
        self._reset_info_keys = _columns(self._core.reset_info_keys)
        self.task, self.num_envs, self.copy = task, int(num_envs), copy
        self._num_threads = int(num_threads)
        self.spec = dataclasses.replace(spec, max_episode_steps=int(max_episode_steps) or None)
        self.metadata = {**ref_env.metadata, "autoreset_mode": autoreset_mode}
        self.render_mode = ref_env.render_mode
        self.dt = float(self._core.dt)
        self.single_action_space = ref_env.action_space
        self.single_observation_space = ref_env.observation_space
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._draw = RESET_STATE[task](self._ref.reset_noise_scale)
        self._qpos0 = np.asarray(self._core.qpos0, dtype=np.float64)
        self._qvel0 = np.zeros(self._core.nv)
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self._seeds: list[int | None] = [None] * self.num_envs
        self._cameras: dict[int, dict] = {}  # render: each sub-env's camera, as its own gymnasium env keeps one
        self._autoreset_mode = autoreset_mode
        self._needs_reset = np.ones(self.num_envs, dtype=bool)  # DISABLED mode bookkeeping
        self._was_reset = np.zeros(self.num_envs, dtype=bool)  # step() before reset() is an error
        self._check_done = True  # DISABLED: refuse to step ended envs (the single-env face allows it)
        self._closed = False

    def _exclusive(self, what: str) -> _OneCaller:
        """One call at a time: a second thread's call fails at once, before it changes anything."""
        return _OneCaller(self, what)

    # ------------------------------------------------------------------ RNG and reset states

    @property
    def np_random_generators(self) -> list[np.random.Generator | None]:
        """Each sub-env's Generator (a few reset states ahead of gymnasium's: see reset_queue)."""
        return list(self._rngs)

    @property
    def np_random_seed(self) -> tuple[int | None, ...]:
        """Each sub-env's seed (as gymnasium's sync vector env gives them)."""
        return tuple(self._seeds)

    @property
    def diverged(self) -> np.ndarray:
        """(num_envs,) bool: the sub-envs whose simulation MuJoCo itself reset during the last
        step (NaN or huge qpos/qvel/qacc; gymnasium's env does the same without saying so)."""
        return self._buf.diverged.copy()

    def _fill_queues(self, envs=None) -> None:
        """Top up each env's reset queue with states drawn from its own Generator, in order."""
        core = self._core
        K = core.reset_queue
        count, head = self._buf.queue_count, self._buf.queue_head
        envs = np.flatnonzero(count < K) if envs is None else envs
        qpos, qvel = self._buf.queue_qpos, self._buf.queue_qvel
        for i in envs:
            if self._rngs[i] is None:
                self._rngs[i], self._seeds[i] = seeding.np_random(None)
            while count[i] < K:
                slot = (head[i] + count[i]) % K
                qpos[i, slot], qvel[i, slot] = self._draw(self._rngs[i], self._qpos0.copy(), self._qvel0.copy())
                count[i] += 1

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        with self._exclusive("reset"):
            return self._reset(seed, options)

    def _reset(self, seed, options):
        if seed is None:
            seeds = [None] * self.num_envs
        elif _is_int(seed):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            if not isinstance(seed, (list, tuple)):
                raise TypeError(f"seed must be an int, a list of num_envs ints/None, or None, got {seed!r}")
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed list must have num_envs={self.num_envs} entries, got {len(seeds)}")
        for s in seeds:  # gymnasium's own check and error, before anything changes
            if s is not None:
                seeding.np_random(int(s) if _is_int(s) else s)
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
        mask = np.ones(self.num_envs, dtype=bool)
        if options and "reset_mask" in options:
            mask = options["reset_mask"]
            if not isinstance(mask, np.ndarray):  # gymnasium's checks and error types
                raise TypeError(f"options['reset_mask'] must be a numpy array, got {type(mask)}")
            if mask.shape != (self.num_envs,):
                raise ValueError(f"options['reset_mask'] must have shape ({self.num_envs},), got {mask.shape}")
            if mask.dtype != np.bool_:
                raise TypeError(f"options['reset_mask'] must have dtype=np.bool_, got {mask.dtype}")
            if not mask.any():
                raise ValueError("options['reset_mask'] must contain at least one True value")
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:  # a new seed drops the states drawn from the old Generator
                self._rngs[i], self._seeds[i] = seeding.np_random(int(seeds[i]))
                self._buf.queue_count[i] = 0
        self._fill_queues()
        with self._mujoco_errors():
            self._core.reset(np.ascontiguousarray(mask))
        self._fill_queues()
        self._needs_reset[mask] = False
        self._was_reset |= mask
        none = np.zeros(self.num_envs, dtype=bool)
        return self._out(self._buf.obs), self._infos(none, mask, np.float32)

    # ------------------------------------------------------------------ step

    def step(self, actions):
        with self._exclusive("step"):
            return self._step(actions)

    def _step(self, actions):
        a = np.asarray(actions)
        if a.dtype.kind not in "fi" or a.dtype.itemsize > 8:  # no bool, unsigned, complex, longdouble
            raise TypeError(f"actions must be a float16/float32/float64 or signed integer array, got dtype {a.dtype}")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        given = a.dtype
        expected = (self.num_envs, self._core.nu)
        if a.shape != expected:
            raise ValueError(f"actions must have shape {expected}, got {a.shape}")
        if not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"actions must be finite; actions[{bad[0]}, {bad[1]}] = {a[tuple(bad)]}")
        if given.kind == "i":  # numpy squares integers in their own dtype (wrapping around)
            with np.errstate(over="ignore"):
                sq, exact = np.square(a), np.square(a.astype(np.float64))
            if not (np.array_equal(sq, exact) and exact.sum(axis=1).max() < 2.0**53):
                raise ValueError(f"integer actions whose squares overflow {given} (numpy would wrap the control cost "
                                 "around) are not supported: pass float actions")
        self._check_was_reset()
        if self._autoreset_mode == AutoresetMode.DISABLED and self._check_done and self._needs_reset.any():
            raise ValueError(
                f"envs {np.flatnonzero(self._needs_reset).tolist()} ended or were never reset; with "
                "autoreset_mode=DISABLED call reset(options={'reset_mask': mask}) before stepping them"
            )
        with self._mujoco_errors():
            if given == np.float16:
                self._core.step(np.ascontiguousarray(a, dtype=np.float32), half=True)
            elif given in (np.float32, np.float64):
                self._core.step(np.ascontiguousarray(a))
            else:
                self._core.step(np.ascontiguousarray(a, dtype=np.float64))
        self._fill_queues()
        term, trunc = self._buf.terminated, self._buf.truncated
        mode = self._autoreset_mode
        if mode == AutoresetMode.NEXT_STEP:  # an env either stepped or (auto)reset
            reset = self._buf.reset_consumed.copy()
        elif mode == AutoresetMode.SAME_STEP:  # ended envs report their reset info, the step's goes to final_info
            reset = self._buf.final_valid.copy()
        else:
            reset = np.zeros(self.num_envs, dtype=bool)
        infos = self._infos(~reset, reset, given)
        if mode == AutoresetMode.SAME_STEP and reset.any():
            final_obs = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(reset):
                final_obs[i] = self._buf.final_obs[i].copy()
            infos.update(final_obs=final_obs, _final_obs=reset.copy(),
                         final_info=self._infos(reset, np.zeros_like(reset), given), _final_info=reset.copy())
        if self._autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= term | trunc
        return self._out(self._buf.obs), self._buf.rewards.copy(), term.copy(), trunc.copy(), infos

    @contextlib.contextmanager
    def _mujoco_errors(self):
        """A MuJoCo error in the C++ envs raises ``mujoco.FatalError`` (as under gymnasium). The
        envs it hit were reset to the model's initial state and the call's results for the others
        are lost, so every env must be reset() before stepping again."""
        try:
            yield
        except self._core_module.MujocoError as e:
            import mujoco

            self._was_reset[:] = False
            self._needs_reset[:] = True
            raise mujoco.FatalError(f"{e}; this call's results are lost: reset() the envs before stepping "
                                    "again") from None

    def _check_was_reset(self):
        if not self._was_reset.all():
            raise gymnasium.error.ResetNeeded(
                f"envs {np.flatnonzero(~self._was_reset).tolist()} were never reset: call reset() first")

    def _infos(self, step_mask, reset_mask, action_dtype) -> dict[str, Any]:
        """gymnasium's vector info dict: each key's values and its ``_key`` mask, with the dtype
        gymnasium's vector env gives it (that of the single env's value: reward_ctrl has the
        action's dtype, a Python float is float64, a Python int int64; arrays are (num_envs, k))."""
        infos: dict[str, Any] = {}
        n = self.num_envs
        step_keys = self._info_keys if step_mask.any() else []
        types = self._ref.step_types(action_dtype).info if step_keys else {}
        values = self._buf.info
        if step_keys and step_mask.all():  # the common case: one copy of the buffer, a row per key
            block, masks = values.T.copy(), np.ones((len(step_keys), n), bool)
            for j, (name, cols, is_array) in enumerate(step_keys):
                dtype = _vector_dtype(types[name])
                v = block[cols].T if is_array else block[cols.start]
                infos[name], infos["_" + name] = (v if v.dtype == dtype else v.astype(dtype)), masks[j]
            step_keys = []
        for name, cols, is_array in step_keys:
            dtype = _vector_dtype(types[name])
            v = values[:, cols] if is_array else values[:, cols.start]
            arr = np.zeros(v.shape, dtype=dtype)
            arr[step_mask] = v[step_mask]
            infos[name], infos["_" + name] = arr, step_mask.copy()
        if reset_mask.any():
            for name, cols, is_array in self._reset_info_keys:
                v = self._buf.reset_info[:, cols] if is_array else self._buf.reset_info[:, cols.start]
                if name not in infos:
                    dtype = _vector_dtype(self._ref.reset_info_types[name])
                    infos[name], infos["_" + name] = np.zeros(v.shape, dtype), np.zeros(n, dtype=bool)
                infos[name][reset_mask] = v[reset_mask]
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
        with self._exclusive("rollout"):
            return self._rollout(policy, num_steps, actions, seed, record_state)

    def _rollout(self, policy, num_steps, actions, seed, record_state):
        self._check_was_reset()
        core = self._core
        if not _is_int(num_steps) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        T = int(num_steps)
        N, nu, D = self.num_envs, core.nu, core.obs_dim
        if (policy is None) == (actions is None):
            raise ValueError("give exactly one of policy (an MLPPolicy) or actions (T, num_envs, nu)")
        core_policy, open_loop = None, None
        if policy is not None:
            if not isinstance(policy, MLPPolicy):
                raise TypeError(f"policy must be an aihf_fast.envs.MLPPolicy, got {type(policy).__name__}")
            core_policy = policy.to_core(_core(), self.single_action_space.low, self.single_action_space.high)
            if seed is not None:
                if not _is_int(seed) or not 0 <= seed < 2**64:
                    raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")
                core.seed_policy_noise(int(seed))
        else:
            open_loop = np.asarray(actions)
            if open_loop.dtype.kind not in "fi" or open_loop.dtype.itemsize > 8:
                raise TypeError(f"actions must be a float or signed integer array, got dtype {open_loop.dtype}")
            if open_loop.shape != (T, N, nu):
                raise ValueError(f"actions must have shape {(T, N, nu)}, got {open_loop.shape}")
            with np.errstate(over="ignore"):  # an overflow is reported below, by name
                open_loop = np.ascontiguousarray(open_loop, dtype=np.float32)  # the rollout's actions are float32
            if not np.isfinite(open_loop).all():  # after the cast: 1e39 is inf in float32
                bad = np.argwhere(~np.isfinite(open_loop))[0]
                raise ValueError(f"actions must be finite in float32; actions[{', '.join(map(str, bad))}] = "
                                 f"{np.asarray(actions)[tuple(bad)]}")
        out = dict(
            obs=np.empty((T, N, D)), actions=np.empty((T, N, nu), np.float32), rewards=np.empty((T, N)),
            terminated=np.empty((T, N), bool), truncated=np.empty((T, N), bool), next_obs=np.empty((T, N, D)),
            diverged=np.empty((T, N), bool),
        )
        if record_state:
            out["qpos"], out["qvel"] = np.empty((T, N, core.nq)), np.empty((T, N, core.nv))
        progress = np.zeros(N, dtype=np.int32)
        self._fill_queues()
        with self._mujoco_errors():
            while core.rollout(core_policy, open_loop, T, progress, out["obs"], out["actions"], out["rewards"],
                               out["terminated"], out["truncated"], out["next_obs"], out["diverged"],
                               out.get("qpos"), out.get("qvel")) < N:
                self._fill_queues()  # some env used up its reset queue
            self._fill_queues()
            ended = self._buf.needs_reset.copy()
            if ended.any() and self._autoreset_mode == AutoresetMode.SAME_STEP:
                core.reset(np.ascontiguousarray(ended))
                self._fill_queues()
        if self._autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset = ended  # the rollout reset every env that ended before its last step
        return out

    def set_state(self, env: int, qpos, qvel) -> np.ndarray:
        """Set sub-env ``env``'s joint positions (nq,) and velocities (nv,) (then mj_forward);
        returns its new observation. Its time-limit counter is unchanged."""
        with self._exclusive("set_state"):
            return self._set_state(env, qpos, qvel)

    def _set_state(self, env, qpos, qvel):
        if not _is_int(env):
            raise TypeError(f"env must be an int index, got {env!r}")
        if not 0 <= env < self.num_envs:
            raise IndexError(f"env must be in [0, {self.num_envs}), got {env}")
        env = int(env)
        for name, v in (("qpos", qpos), ("qvel", qvel)):
            if np.asarray(v).dtype.kind not in "biuf":
                raise TypeError(f"{name} must be a real array, got dtype {np.asarray(v).dtype}")
        qpos = np.ascontiguousarray(qpos, dtype=np.float64)
        qvel = np.ascontiguousarray(qvel, dtype=np.float64)
        if qpos.shape != (self._core.nq,) or qvel.shape != (self._core.nv,):
            raise ValueError(f"qpos must be ({self._core.nq},) and qvel ({self._core.nv},), got {qpos.shape}, {qvel.shape}")
        if not (np.isfinite(qpos).all() and np.isfinite(qvel).all()):
            raise ValueError("qpos and qvel must be finite")
        with self._mujoco_errors():
            self._core.set_state(env, qpos, qvel)
        self._needs_reset[env] = False
        self._was_reset[env] = True
        return self._buf.obs[env].copy()

    # ------------------------------------------------------------------ MuJoCo model, data, rendering

    @property
    def model(self):
        """The ``mujoco.MjModel`` compiled from the task's model file, as gymnasium's env holds it
        (the C++ envs simulate identical copies; changing this one does not change them)."""
        return self._ref.env.model

    def get_data(self, env: int = 0):
        """A ``mujoco.MjData`` snapshot of sub-env ``env``: a copy of its whole mjData
        (``mj_copyData``), not a live view; writing to it does not change the simulation."""

        with self._exclusive("get_data"):
            if not _is_int(env) or not 0 <= env < self.num_envs:
                raise IndexError(f"env must be an int in [0, {self.num_envs}), got {env!r}")
            data = mujoco.MjData(self._ref.env.model)
            self._core.copy_data(int(env), data._address)
            return data

    def render(self, env: int | None = None):
        """Render with gymnasium's MuJoCo renderer (``render_mode`` given at construction):
        sub-env ``env``'s frame, or with ``env=None`` a tuple of every sub-env's frame, as
        gymnasium's sync vector env returns. Each sub-env keeps its own camera, set up from its
        own state on its first render as gymnasium's renderer does. Offscreen rendering needs an
        OpenGL backend: ``MUJOCO_GL=egl`` (a GPU driver, or Mesa's software EGL) or
        ``MUJOCO_GL=osmesa`` (Debian package libosmesa6)."""
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without a render_mode: pass render_mode='rgb_array' to make()")
            return None
        with self._exclusive("render"):
            envs = range(self.num_envs) if env is None else [env]
            for i in envs:
                if not _is_int(i) or not 0 <= i < self.num_envs:
                    raise IndexError(f"env must be an int in [0, {self.num_envs}), got {i!r}")
            if not self._was_reset[list(envs)].all():
                raise gymnasium.error.ResetNeeded("Cannot call render() before calling reset()")
            try:
                return tuple(self._render_one(int(i)) for i in envs) if env is None else self._render_one(int(env))
            except Exception as e:  # noqa: BLE001 - a missing GL backend surfaces in many forms
                raise RuntimeError(
                    f"MuJoCo could not render ({type(e).__name__}: {e}); offscreen rendering needs an OpenGL "
                    "backend: set MUJOCO_GL=egl (a GPU driver, or Mesa's software EGL) or MUJOCO_GL=osmesa (apt "
                    "install libosmesa6) before importing mujoco") from e

    def _render_one(self, i: int):
        ref = self._ref.env
        self._core.copy_data(i, ref.data._address)
        renderer = ref.mujoco_renderer
        viewer = renderer._get_viewer(self.render_mode)  # gymnasium's viewer, made on first use
        cam = viewer.cam
        if i in self._cameras:
            for k, v in self._cameras[i].items():
                if k == "lookat":
                    cam.lookat[:] = v
                else:
                    setattr(cam, k, v)
        else:  # as gymnasium sets up a new viewer's camera: from this sub-env's state, then the config
            viewer._init_camera()
            renderer._set_cam_config()
        frame = ref.render()
        self._cameras[i] = {k: (cam.lookat.copy() if k == "lookat" else getattr(cam, k)) for k in _CAMERA_FIELDS}
        return frame

    def _out(self, a):
        return a.copy() if self.copy else a

    def close_extras(self, **kwargs):
        if self._closed:
            return
        with self._exclusive("close"):
            self._closed = True
            self._core = self._buf = None
            self._ref.close()

    @property
    def num_threads(self) -> int:
        return self._num_threads

    def __repr__(self) -> str:
        return f"BatchedMujocoVectorEnv({self.task}, num_envs={self.num_envs})"


class _OneCaller:
    """The env's busy lock for one call (a plain class: cheaper than a generator context manager
    in the step loop). Raises RuntimeError if another thread is inside a call, or the env is closed."""

    __slots__ = ("env", "what")

    def __init__(self, env, what: str):
        self.env, self.what = env, what

    def __enter__(self):
        if not self.env._lock.acquire(blocking=False):
            raise RuntimeError(f"this env is busy: another thread is inside a call on it ({self.what} refused)")
        if self.env._closed:
            self.env._lock.release()
            raise RuntimeError(f"this {type(self.env).__name__} is closed")

    def __exit__(self, *exc):
        self.env._lock.release()
        return False


class _Buffers:
    """The C++ env's buffers as NumPy views (each keeps the env alive)."""

    NAMES = ("obs", "rewards", "terminated", "truncated", "reset_consumed", "final_valid", "final_obs", "diverged",
             "failed", "info", "reset_info", "needs_reset", "queue_count", "queue_head", "queue_qpos", "queue_qvel")

    def __init__(self, core):
        for name in self.NAMES:
            setattr(self, name, getattr(core, name))


_CAMERA_FIELDS = ("type", "fixedcamid", "trackbodyid", "lookat", "distance", "azimuth", "elevation", "orthographic")


def _columns(keys) -> list[tuple[str, slice, bool]]:
    out, start = [], 0
    for name, width, is_array in keys:
        out.append((name, slice(start, start + width), is_array))
        start += width
    return out


def _vector_dtype(single_type) -> np.dtype:
    """The dtype gymnasium's vector env stores a single env's info value of this type in."""
    return np.dtype(np.float64) if single_type is np.ndarray else np.dtype(single_type)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
