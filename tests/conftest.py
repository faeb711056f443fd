"""Shared test setup: Triton runs through its interpreter when no GPU is present, and GPU tests are marked."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported so every @triton.jit kernel runs on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.runtime.interpreter as _interp

    if hasattr(_interp, "_patch_lang_tensor"):
        _patch_lang_tensor = _interp._patch_lang_tensor

        def _patch_with_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            # Triton 3.6's interpreter int()s 1-element arrays for runtime loop bounds; NumPy >= 2.4 refuses.
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_with_index

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running CPU test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
