"""aihf_fast: one-stage alignment from demonstrations and preferences (AIHF), fast.

``aihf_fast.ops``: fused per-token log-prob kernels and the joint demonstration + preference loss.
"""
from .ops import (
    AIHFLoss,
    AIHFLossOutput,
    BatchLayout,
    LossConfig,
    aihf_loss,
    linear_token_logprobs,
    method_config,
    token_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "AIHFLoss",
    "AIHFLossOutput",
    "BatchLayout",
    "LossConfig",
    "aihf_loss",
    "linear_token_logprobs",
    "method_config",
    "token_logprobs",
    "__version__",
]
