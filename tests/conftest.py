import importlib
import os

import pytest
import torch

# CI (.ci/run) sets AIHF_FAST_STRICT_IMPORTS=1: there, a test module's pytest.importorskip of a
# package that does not import is an error, not a skip, so a package missing from the [test]
# extra fails CI by name instead of quietly skipping its tests.
if os.environ.get("AIHF_FAST_STRICT_IMPORTS") == "1":
    _importorskip = pytest.importorskip

    def _strict_importorskip(modname, minversion=None, reason=None, **kwargs):
        importlib.import_module(modname)  # raises ImportError/ModuleNotFoundError with its name
        return _importorskip(modname, minversion=minversion, reason=reason, **kwargs)

    pytest.importorskip = _strict_importorskip

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before aihf_fast's kernels import,
# so the Triton backend runs on CPU here and on the GPU where there is one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
