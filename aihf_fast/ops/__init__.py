"""Fused ops: per-token log-probs (from logits or hidden + LM head) and the joint AIHF loss.

Triton kernels on CUDA, the PyTorch reference (``aihf_fast.ops.reference``) elsewhere; choose
with ``backend=`` or ``AIHF_FAST_BACKEND=auto|triton|torch``.
"""
from .aihf_loss import AIHFLossOutput, BatchLayout, LossConfig, aihf_loss, method_config
from .logprobs import default_chunk_size, linear_token_logprobs, token_logprobs
from .modules import AIHFLoss
from .validation import NonFiniteError

__all__ = [
    "AIHFLoss",
    "AIHFLossOutput",
    "BatchLayout",
    "LossConfig",
    "NonFiniteError",
    "aihf_loss",
    "default_chunk_size",
    "linear_token_logprobs",
    "method_config",
    "token_logprobs",
]
