"""kernels/gemv.py (batch-1 GEMV) vs torch: error vs fp32 <= 2x torch's same-dtype error + eps."""
import pytest
import torch

from pixtral_rt.kernels.gemv import gemv
from tests.conftest import requires_gpu


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(device, dtype, N, K, **cfg):
    torch.manual_seed(N + K)
    x = torch.randn(1, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype) * 0.02
    out = torch.full((1, N), float("nan"), device=device, dtype=dtype)
    gemv(x, w, out=out, **cfg)
    ref = x.double() @ w.double().T
    assert not torch.isnan(out).any()
    assert rel(out, ref) <= 2 * rel(x @ w.T, ref) + 1e-6


@pytest.mark.parametrize("N,K,block_k", [(37, 300, 64), (64, 256, 128), (1, 97, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_small(device, dtype, N, K, block_k):
    check(device, dtype, N, K, block_k=block_k)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (131072, 5120), (97, 1000)])
@pytest.mark.parametrize("block_n,block_k", [(8, 512), (16, 256), (4, 1024)])
def test_gemv_bf16(N, K, block_n, block_k):
    check("cuda", torch.bfloat16, N, K, block_n=block_n, block_k=block_k)
