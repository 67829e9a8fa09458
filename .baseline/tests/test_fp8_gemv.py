"""kernels/fp8_gemv.py (FP8-weight GEMV / skinny GEMM for decode) against the exact formula in float64.
Tolerance: the kernel's error <= 2x torch's own same-dtype error on the same formula (+ a tiny epsilon): the
FP8 operands are exact, so only accumulation order and the final rounding differ."""
import pytest
import torch

from pixtral_rt.kernels.fp8_gemv import fp8_gemv
from tests.conftest import requires_gpu
from tests.helpers import fp8_weights, rel


def check_gemv(device, dtype, M, N, K, **cfg):
    torch.manual_seed(M * 7 + N)
    x = torch.randn(M, K, device=device, dtype=dtype)
    w8, s = fp8_weights(N, K, device, N + K)
    out = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    fp8_gemv(x, w8, s, out=out, **cfg)
    ref = (x.double() @ w8.double().T) * s.double()
    torch_same_dtype = ((x @ w8.to(dtype).T).float() * s).to(dtype)
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(torch_same_dtype, ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("M,N,K,cfg", [
    (1, 37, 300, dict(block_n=8, block_k=64)), (1, 64, 1024, dict(block_n=16, block_k=256)),
    (1, 1, 97, dict(block_n=4, block_k=32)), (1, 33, 20, dict(block_n=8, block_k=64, peel=True)),
    (2, 37, 300, dict(block_n=32, block_k=64)), (5, 70, 160, dict(block_n=16, block_k=32)),
    (17, 64, 96, dict(block_n=32, block_k=32)), (64, 40, 64, dict(block_n=16, block_k=64)),
    (70, 24, 48, dict(block_n=16, block_k=16, block_m=32)),      # several M tiles
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp8_gemv_small(device, dtype, M, N, K, cfg):
    check_gemv(device, dtype, M, N, K, **cfg)


def test_fp8_gemv_peeled_equals_plain(device):
    torch.manual_seed(3)
    x = torch.randn(1, 300, device=device)
    w8, s = fp8_weights(37, 300, device, 1)
    a = fp8_gemv(x, w8, s, block_n=8, block_k=64)
    b = fp8_gemv(x, w8, s, block_n=8, block_k=64, peel=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fp8_gemv_rejects_bad_inputs(device):
    w8, s = fp8_weights(8, 32, device, 0)
    with pytest.raises(ValueError, match="do not match"):
        fp8_gemv(torch.randn(1, 31, device=device), w8, s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemv(torch.randn(1, 32, device=device), w8.float(), s)
    with pytest.raises(ValueError, match="scale"):
        fp8_gemv(torch.randn(1, 32, device=device), w8, s[:4])


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (97, 1000)])
@pytest.mark.parametrize("M", [1, 2, 7, 16, 33, 64])
def test_fp8_gemv_bf16(M, N, K):
    check_gemv("cuda", torch.bfloat16, M, N, K)


@requires_gpu
@pytest.mark.gpu
def test_fp8_gemv_pdl_equals_plain():
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    w8, s = fp8_weights(6144, 5120, "cuda", 2)
    assert torch.equal(fp8_gemv(x, w8, s), fp8_gemv(x, w8, s, pdl=True))
