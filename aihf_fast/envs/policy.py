"""MLP policies the C++ rollouts evaluate: the layer layout of SAC / PPO actors.

    out = W_L act(... act(W_1 x + b_1) ...) + b_L            (float32, act = tanh or relu)
    x = clip(obs, obs_low, obs_high) per dimension (no clip when the bounds are None)
    mean = out[:nu];  log_std = out[nu:] (SAC, clamped) or a fixed vector (PPO)
    u = mean (deterministic) or mean + exp(log_std) * eps, eps ~ N(0, 1) per env (gaussian)
    action = low + (tanh(u) + 1) / 2 * (high - low)   (squash="tanh", SAC)
           = clip(u, low, high)                        (squash="clip", PPO)
           = u                                         (squash="none")
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVATIONS = {"tanh": 0, "relu": 1}
SQUASHES = {"tanh": 0, "clip": 1, "none": 2}


@dataclass
class MLPPolicy:
    """weights[k]: (out_k, in_k) and biases[k]: (out_k,), as ``torch.nn.Linear`` stores them."""

    weights: list
    biases: list
    activation: str = "tanh"
    squash: str = "tanh"
    gaussian: bool = False
    log_std: np.ndarray | None = None  # fixed (nu,) log std (PPO); None + gaussian: from the output (SAC)
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    obs_low: np.ndarray | None = None   # (obs_dim,) float64 bounds of the input, or None (no clip)
    obs_high: np.ndarray | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.squash not in SQUASHES:
            raise ValueError(f"squash must be one of {sorted(SQUASHES)}, got {self.squash!r}")
        if not float(self.log_std_min) <= float(self.log_std_max):
            raise ValueError(f"log_std_min must be <= log_std_max, got {self.log_std_min} > {self.log_std_max}")
        self.weights = [np.ascontiguousarray(_np(w), dtype=np.float32) for w in self.weights]
        self.biases = [np.ascontiguousarray(_np(b), dtype=np.float32) for b in self.biases]
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"layer {k}: weight must be (out, in) and bias (out,), got {w.shape}, {b.shape}")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise ValueError(f"layer {k}: weights must be finite")
        if self.log_std is not None:
            self.log_std = np.ascontiguousarray(_np(self.log_std), dtype=np.float32).reshape(-1)
            if not np.isfinite(self.log_std).all():
                raise ValueError("log_std must be finite")
        if (self.obs_low is None) != (self.obs_high is None):
            raise ValueError("obs_low and obs_high must be given together")
        if self.obs_low is not None:
            if not self.weights:
                raise ValueError("weights must have at least one layer")
            self.obs_low = np.array(_np(self.obs_low), dtype=np.float64).reshape(-1)  # copies: checked once
            self.obs_high = np.array(_np(self.obs_high), dtype=np.float64).reshape(-1)
            n = self.weights[0].shape[1]
            if self.obs_low.shape != (n,) or self.obs_high.shape != (n,):
                raise ValueError(f"obs_low and obs_high must have shape ({n},) (the first layer's input size), got "
                                 f"{self.obs_low.shape} and {self.obs_high.shape}")
            if np.isnan(self.obs_low).any() or np.isnan(self.obs_high).any():
                raise ValueError("obs_low and obs_high must not be NaN (use -inf / inf for a dimension left unclipped)")
            if not (self.obs_low <= self.obs_high).all():
                raise ValueError("obs_low must be <= obs_high in every dimension")

    @classmethod
    def from_torch(cls, module, **kwargs) -> MLPPolicy:
        """The ``torch.nn.Linear`` layers of ``module`` in registration order (e.g. an
        ``nn.Sequential(Linear, Tanh, Linear, Tanh, Linear)`` actor)."""
        import torch

        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("module has no torch.nn.Linear layers")
        w = [m.weight.detach().cpu().float().numpy() for m in linears]
        b = [(m.bias.detach().cpu().float().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32))
             for m in linears]
        return cls(w, b, **kwargs)

    def to_core(self, core_module, low, high):
        gaussian_from_output = self.gaussian and self.log_std is None
        return core_module.MLPPolicy(
            self.weights, self.biases, ACTIVATIONS[self.activation], SQUASHES[self.squash], self.gaussian,
            gaussian_from_output, self.log_std if self.log_std is not None else np.zeros(0, np.float32),
            float(self.log_std_min), float(self.log_std_max), [float(v) for v in low], [float(v) for v in high],
            [] if self.obs_low is None else self.obs_low.tolist(), [] if self.obs_high is None else self.obs_high.tolist(),
        )


def _np(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
