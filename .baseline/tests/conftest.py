"""Shared test setup.

On a machine without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before triton
is imported), so CI checks kernel logic on small fp16/fp32 shapes. GPU-only tests carry `requires_gpu`,
whose skip reason says why.
"""
import os

import pytest

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bf16 kernels, full-size weights); "
                                                       "run on the GPU machine, see README")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason on CPU")


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
