"""kernels/fp8_gemm.py (FP8 x FP8 GEMM with per-token and per-channel scales, prefill) against the exact
formula in float64, both backends (torch._scaled_mm on the GPU, the Triton kernel everywhere)."""
import pytest
import torch

from pixtral_rt.fp8 import quantize_activations
from pixtral_rt.kernels.fp8_gemm import fp8_gemm
from tests.conftest import requires_gpu
from tests.helpers import fp8_weights, rel


def check_gemm(device, out_dtype, M, N, K, backend, **tiles):
    torch.manual_seed(M + N * 3 + K)
    x = torch.randn(M, K, device=device) * 2
    x8, sx = quantize_activations(x)
    w8, sw = fp8_weights(N, K, device, M + K)
    out = torch.full((M, N), float("nan"), device=device, dtype=out_dtype)
    fp8_gemm(x8, sx, w8, sw, out_dtype=out_dtype, backend=backend, out=out, **tiles)
    ref = (x8.double() @ w8.double().T) * sx.double() * sw.double()
    torch_same = ((x8.float() @ w8.float().T) * sx * sw).to(out_dtype)
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(torch_same, ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("M,N,K,tiles", [
    (1, 37, 300, dict(block_m=16, block_n=32, block_k=64)), (33, 70, 160, dict(block_m=16, block_n=32, block_k=32)),
    (100, 48, 64, dict(block_m=32, block_n=16, block_k=32, group_m=2)), (16, 16, 16, dict(block_m=16, block_n=16,
                                                                                          block_k=16)),
])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_fp8_gemm_triton_small(device, out_dtype, M, N, K, tiles):
    check_gemm(device, out_dtype, M, N, K, "triton", **tiles)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["scaled_mm", "triton"])
@pytest.mark.parametrize("M,N,K", [(4193, 6144, 5120), (97, 5120, 4096), (1, 28672, 5120), (1025, 5120, 14336)])
def test_fp8_gemm_bf16(backend, M, N, K):
    check_gemm("cuda", torch.bfloat16, M, N, K, backend)
