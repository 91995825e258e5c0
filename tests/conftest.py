import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before aihf_fast's kernels import,
# so the Triton backend runs on CPU here and on the GPU where there is one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
