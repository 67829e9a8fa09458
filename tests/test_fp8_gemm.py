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


# backend "skinny" (decode rows, W8A8): every row of x in one padded tile, W tiles against it
@pytest.mark.parametrize("M,N,K,tiles", [
    (1, 37, 300, dict(block_n=32, block_k=64)), (5, 70, 160, dict(block_n=16, block_k=32)),
    (33, 48, 64, dict(block_n=32, block_k=32)), (64, 16, 48, dict(block_n=16, block_k=16)),
    (2, 100, 96, dict(block_n=64, block_k=32, block_m=32)),
    (1, 70, 300, dict(block_n=16, block_k=32, split_k=3)), (9, 48, 256, dict(block_n=16, block_k=64, split_k=4)),
    (3, 40, 100, dict(block_n=32, block_k=32, split_k=8)),           # 4 K tiles over "8" splits: 4 used
])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_fp8_gemm_skinny_small(device, out_dtype, M, N, K, tiles):
    check_gemm(device, out_dtype, M, N, K, "skinny", **tiles)


def test_fp8_gemm_skinny_split_k_repeats(device):
    """Split K: the same bytes call after call (the counters reset themselves; partials summed in split order)."""
    x8, sx = quantize_activations(torch.randn(2, 512, device=device))
    w8, sw = fp8_weights(48, 512, device, 3)
    a = fp8_gemm(x8, sx, w8, sw, backend="skinny", block_n=16, block_k=64, split_k=4)
    for _ in range(2):
        assert torch.equal(a, fp8_gemm(x8, sx, w8, sw, backend="skinny", block_n=16, block_k=64, split_k=4))


def test_fp8_gemm_skinny_refuses(device):
    x8, sx = quantize_activations(torch.randn(65, 32, device=device))
    w8, sw = fp8_weights(16, 32, device, 0)
    with pytest.raises(ValueError, match="at most 64 rows"):
        fp8_gemm(x8, sx, w8, sw, backend="skinny")
    with pytest.raises(ValueError, match="block_m 16 < 20"):
        fp8_gemm(x8[:20], sx[:20], w8, sw, backend="skinny", block_m=16)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 16, 33, 64])
@pytest.mark.parametrize("N,K", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336)])
@pytest.mark.parametrize("split_k", [1, 4])
def test_fp8_gemm_skinny_bf16(M, N, K, split_k):
    check_gemm("cuda", torch.bfloat16, M, N, K, "skinny", split_k=split_k, block_n=32)


@requires_gpu
@pytest.mark.gpu
def test_fp8_gemm_skinny_pdl_equals_plain():
    x8, sx = quantize_activations(torch.randn(3, 5120, device="cuda"))
    w8, sw = fp8_weights(6144, 5120, "cuda", 1)
    a = fp8_gemm(x8, sx, w8, sw, backend="skinny")
    assert torch.equal(a, fp8_gemm(x8, sx, w8, sw, backend="skinny", pdl=True))
