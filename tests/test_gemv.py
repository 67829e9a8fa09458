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


# ----------------------------------------------------------------------------- gemv_fused (decode fusions)
from pixtral_rt.kernels.gemv import gemv_fused  # noqa: E402


def ref_fused(x, w, norm_weight, eps, silu, residual, dtype):
    """The unfused ops in `dtype` (torch's own rounding), as the decoder ran them before."""
    x = x.to(dtype)
    if silu:
        g, u = x.chunk(2, -1)
        x = torch.nn.functional.silu(g) * u
    if norm_weight is not None:
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * norm_weight.to(dtype)
    y = x @ w.to(dtype).T
    return y + residual.to(dtype) if residual is not None else y


def check_fused(device, dtype, N, K, norm, silu, residual, out_dtype=None, **cfg):
    torch.manual_seed(N * 7 + K + 100 * norm + 10 * silu + residual)
    x = torch.randn(1, 2 * K if silu else K, device=device, dtype=dtype) * 2
    w = torch.randn(N, K, device=device, dtype=dtype) * 0.02
    g = (1 + 0.1 * torch.randn(K, device=device)).to(dtype) if norm else None
    r = torch.randn(1, N, device=device, dtype=dtype) if residual else None
    out = torch.full((1, N), float("nan"), device=device, dtype=out_dtype or dtype)
    gemv_fused(x, w, norm_weight=g, eps=1e-5, silu=silu, residual=r, out=out, **cfg)
    ref = ref_fused(x, w, g, 1e-5, silu, r, torch.float64)
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(ref_fused(x, w, g, 1e-5, silu, r, dtype), ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("N,K,block_n,block_k", [(37, 300, 8, 64), (64, 256, 16, 128), (29, 97, 4, 32),
                                                 (33, 64, 8, 64)])
@pytest.mark.parametrize("norm,silu,residual", [(True, False, False), (False, True, True), (False, False, True),
                                                (True, False, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_fused_small(device, dtype, N, K, block_n, block_k, norm, silu, residual):
    check_fused(device, dtype, N, K, norm, silu, residual, block_n=block_n, block_k=block_k)


def test_gemv_fused_fp32_out(device):
    check_fused(device, torch.float16, 50, 128, True, False, False, out_dtype=torch.float32, block_k=64)


def test_gemv_fused_shape_errors(device):
    x = torch.randn(1, 64, device=device)
    w = torch.randn(16, 64, device=device)
    with pytest.raises(ValueError, match="x"):
        gemv_fused(x, w, silu=True)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv_fused(x, w, norm_weight=torch.ones(63, device=device))
    with pytest.raises(ValueError, match="residual"):
        gemv_fused(x, w, residual=torch.ones(1, 15, device=device))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K,norm,silu,residual", [(6144, 5120, True, False, False), (5120, 4096, False, False, True),
                                                    (28672, 5120, True, False, False), (5120, 14336, False, True, True),
                                                    (131072, 5120, True, False, False), (97, 1000, True, True, True)])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_fused_bf16(N, K, norm, silu, residual, pdl):
    check_fused("cuda", torch.bfloat16, N, K, norm, silu, residual, pdl=pdl, block_n=8, block_k=512)
