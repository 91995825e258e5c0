"""Backend choice: ``backend=`` argument, else ``AIHF_FAST_BACKEND`` (auto | triton | torch).

auto: Triton kernels for CUDA tensors when Triton imports, the PyTorch reference otherwise.
triton: always the kernels; on CPU tensors this needs ``TRITON_INTERPRET=1`` (tests do this).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose main input is ``tensor``."""
    choice = backend if backend is not None else os.environ.get("AIHF_FAST_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS} (argument or AIHF_FAST_BACKEND), got {choice!r}"
        )
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' was asked for but triton is not installed")
    if not tensor.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before aihf_fast's "
            f"kernels are imported to run them on CPU; got a tensor on {tensor.device}"
        )
    return "triton"
