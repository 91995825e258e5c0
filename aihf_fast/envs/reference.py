"""gymnasium's own environment object for a task and its constructor options.

The C++ core simulates; this object is the source of everything gymnasium decides: it is built
with the user's keywords exactly as ``gymnasium.make(task, **kwargs)`` builds its env (so bad
options raise gymnasium's own errors), and it gives the resolved options, the model file, the
spaces, the Python types of the values gymnasium returns (probed once per action dtype), and
the renderer.
"""
from __future__ import annotations

import contextlib
import dataclasses
from numbers import Real
from typing import Any

import gymnasium
import numpy as np
from gymnasium.envs.registration import load_env_creator

# C++ option name -> gymnasium's attribute on the env; each task passes the ones its env has.
_SCALARS = {
    "forward_reward_weight": "_forward_reward_weight",
    "healthy_reward": "_healthy_reward",
    "contact_cost_weight": "_contact_cost_weight",
    "reward_dist_weight": "_reward_dist_weight",
    "reward_near_weight": "_reward_near_weight",
    "impact_cost_weight": "_impact_cost_weight",
}
_CTRL_WEIGHTS = {"ctrl_cost_weight": "_ctrl_cost_weight", "reward_control_weight": "_reward_control_weight"}
_FLAGS = {
    "terminate_when_unhealthy": "_terminate_when_unhealthy",
    "exclude_current_positions_from_observation": "_exclude_current_positions_from_observation",
    "include_cfrc_ext_in_observation": "_include_cfrc_ext_in_observation",
    "include_cinert_in_observation": "_include_cinert_in_observation",
    "include_cvel_in_observation": "_include_cvel_in_observation",
    "include_qfrc_actuator_in_observation": "_include_qfrc_actuator_in_observation",
}
_RANGES = {
    "healthy_z_range": "_healthy_z_range",
    "healthy_angle_range": "_healthy_angle_range",
    "healthy_state_range": "_healthy_state_range",
    "contact_force_range": "_contact_force_range",
    "contact_cost_range": "_contact_cost_range",
    "impact_cost_range": "_impact_cost_range",
}


@dataclasses.dataclass(frozen=True)
class StepTypes:
    """The Python types of gymnasium's step outputs for one action dtype."""

    reward: type
    info: dict[str, type]


class Reference:
    """gymnasium's env for ``task`` built with ``options`` (see the module docstring)."""

    def __init__(self, task: str, options: dict[str, Any]):
        spec = gymnasium.spec(task)
        kwargs = {**spec.kwargs, **options}
        self.env = load_env_creator(spec.entry_point)(**kwargs)  # gymnasium's checks and errors
        self.spec = dataclasses.replace(spec, kwargs=kwargs)
        self.task = task
        self._step_types: dict[np.dtype, StepTypes] = {}
        with self._model_must_fit():
            _, info = self.env.reset(seed=0)
        self.reset_info_types = {k: type(v) for k, v in info.items()}

    @contextlib.contextmanager
    def _model_must_fit(self):
        try:
            yield
        except (KeyError, IndexError, ValueError) as e:  # e.g. a body the task needs is not in the model
            raise ValueError(f"the model {self.model_path} does not fit {self.task}: gymnasium's env fails on it "
                             f"with {type(e).__name__}: {e}") from e

    @property
    def model_path(self) -> str:
        return self.env.fullpath

    @property
    def reset_noise_scale(self):
        """As given (its numpy type is kept: the reset draws do gymnasium's arithmetic with it)."""
        return getattr(self.env, "_reset_noise_scale", None)

    def core_options(self) -> dict[str, float]:
        """The options as the C++ task reads them (ranges split, flags 0/1, main_body as an id)."""
        env = self.env
        out = {"frame_skip": _number("frame_skip", env.frame_skip, integer=True)}
        for name, attr in _SCALARS.items():
            if hasattr(env, attr):
                out[name] = _number(name, getattr(env, attr))
        for name, attr in _CTRL_WEIGHTS.items():
            if hasattr(env, attr):
                w = getattr(env, attr)
                out[name] = _number(name, w)
                # numpy's precision of weight * sum(square(action)) for float16 / float32 actions
                w = w[()] if isinstance(w, np.ndarray) else w
                out[name + "_bits16"] = 8.0 * np.result_type(w, np.float16).itemsize
                out[name + "_bits32"] = 8.0 * np.result_type(w, np.float32).itemsize
        for name, attr in _FLAGS.items():
            if hasattr(env, attr):
                flag = getattr(env, attr)
                if not (isinstance(flag, (bool, np.bool_)) or (isinstance(flag, (int, np.integer)) and flag in (0, 1))):
                    raise TypeError(f"{name} must be a bool, got {flag!r}")
                out[name] = float(bool(flag))
        for name, attr in _RANGES.items():
            if hasattr(env, attr):
                r = getattr(env, attr)
                if not (isinstance(r, (tuple, list, np.ndarray)) and len(r) == 2):
                    raise ValueError(f"{name} must be a (low, high) pair, got {r!r}")
                out[name + "_min"], out[name + "_max"] = _number(name, r[0]), _number(name, r[1])
        if hasattr(env, "_main_body"):
            try:
                out["main_body"] = float(env.data.body(env._main_body).id)
            except (KeyError, IndexError, TypeError) as e:  # the error gymnasium's step would raise
                raise type(e)(f"main_body {env._main_body!r} is not a body of {self.model_path}: {e}") from e
        return out

    def step_types(self, action_dtype) -> StepTypes:
        """The types gymnasium's step returns for actions of ``action_dtype`` (one probe step)."""
        dtype = np.dtype(action_dtype)
        if dtype not in self._step_types:
            mode, self.env.render_mode = self.env.render_mode, None  # no window for the probe
            try:
                with self._model_must_fit():
                    self.env.reset(seed=0)
                    _, reward, _, _, info = self.env.step(np.zeros(self.env.action_space.shape, dtype=dtype))
            finally:
                self.env.render_mode = mode
            self._step_types[dtype] = StepTypes(type(reward), {k: type(v) for k, v in info.items()})
        return self._step_types[dtype]

    def close(self) -> None:
        self.env.close()


def _number(name: str, value, integer: bool = False) -> float:
    """An option value as the C++ task reads it (float64). Python and numpy real scalars and 0-d
    arrays are taken as gymnasium takes them; longdouble is refused (the core computes in float64)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not isinstance(value, (Real, np.number)) or isinstance(value, np.complexfloating):
        raise TypeError(f"{name} must be {'an int' if integer else 'a real number'}, got {value!r}")
    if isinstance(value, np.floating) and value.dtype.itemsize > 8:
        raise TypeError(f"{name} as {value.dtype} is not supported (the C++ core computes in float64): pass a float")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return float(value)
