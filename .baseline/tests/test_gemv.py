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


# ----------------------------------------------------------------------------- peeled first tile / PDL / GLU
def ref_glu(x, w, dtype):
    """w13 GEMV then silu_mul, in `dtype` (torch's rounding): what the 'none' decode path computes."""
    y = x.to(dtype) @ w.to(dtype).T
    g, u = y.chunk(2, -1)
    return torch.nn.functional.silu(g) * u


def check_glu(device, dtype, H, K, out_dtype=None, **cfg):
    torch.manual_seed(H * 3 + K)
    x = torch.randn(1, K, device=device, dtype=dtype)
    w = torch.randn(2 * H, K, device=device, dtype=dtype) * 0.1
    out = torch.full((1, H), float("nan"), device=device, dtype=out_dtype or dtype)
    gemv(x, w, out=out, glu=True, **cfg)
    ref = ref_glu(x, w, torch.float64)
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(ref_glu(x, w, dtype), ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    return out


@pytest.mark.parametrize("N,K,block_n,block_k", [(37, 300, 8, 64), (64, 256, 16, 128), (1, 97, 4, 32),
                                                 (33, 20, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_peeled_equals_plain(device, dtype, N, K, block_n, block_k):
    """The PDL code shape (first W tile loaded before the loop) without PDL: same values as the plain loop."""
    check(device, dtype, N, K, block_n=block_n, block_k=block_k, peel=True)
    torch.manual_seed(5)
    x = torch.randn(1, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype)
    a = gemv(x, w, block_n=block_n, block_k=block_k)
    b = gemv(x, w, block_n=block_n, block_k=block_k, peel=True)
    torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)


@pytest.mark.parametrize("H,K,block_n,block_k", [(37, 300, 8, 64), (64, 256, 16, 128), (1, 97, 4, 32),
                                                 (29, 64, 8, 64)])
@pytest.mark.parametrize("peel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_glu_small(device, dtype, H, K, block_n, block_k, peel):
    check_glu(device, dtype, H, K, block_n=block_n, block_k=block_k, peel=peel)


def test_gemv_glu_fp32_out_and_errors(device):
    check_glu(device, torch.float16, 50, 128, out_dtype=torch.float32, block_k=64)
    x = torch.randn(1, 64, device=device)
    with pytest.raises(ValueError, match="glu"):
        gemv(x, torch.randn(15, 64, device=device), glu=True)
    with pytest.raises(ValueError, match="out"):
        gemv(x, torch.randn(16, 64, device=device), glu=True, out=torch.empty(1, 16, device=device))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K,cfg", [(6144, 5120, (8, 512, 4, 4)), (5120, 4096, (16, 512, 4, 4)),
                                     (28672, 5120, (16, 256, 4, 6)), (5120, 14336, (8, 512, 4, 4)),
                                     (131072, 5120, (8, 1024, 8, 3)), (97, 1000, (8, 512, 4, 4))])
def test_gemv_pdl_bf16(N, K, cfg):
    """pdl=True (peeled, griddepcontrol) on every decoder shape: correct, and bit-identical to pdl=False."""
    bn, bk, nw, ns = cfg
    kw = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
    check("cuda", torch.bfloat16, N, K, pdl=True, **kw)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    a = gemv(x, w, **kw)
    b = gemv(x, w, pdl=True, **kw)
    assert torch.equal(a, b)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("H,K", [(14336, 5120), (97, 1000)])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_glu_bf16(H, K, pdl):
    from pixtral_rt.kernels.silu_mul import silu_mul
    out = check_glu("cuda", torch.bfloat16, H, K, block_n=8, block_k=256, num_warps=4, num_stages=6, pdl=pdl)
    torch.manual_seed(H * 3 + K)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * H, K, device="cuda", dtype=torch.bfloat16) * 0.1
    two = silu_mul(gemv(x, w, block_n=8, block_k=256))   # same K tiling: same dot products, same roundings
    print(f"glu vs gemv+silu_mul: max abs diff {(out.float() - two.float()).abs().max().item():.3e}")
    torch.testing.assert_close(out, two, rtol=1e-2, atol=1e-3)


@requires_gpu
@pytest.mark.gpu
def test_pdl_chain_kernels_bf16():
    """rms_norm_pdl / silu_mul_pdl (programmatic dependent launches in a chain after a PDL GEMV) give the
    same bits as the plain launchers."""
    from pixtral_rt.kernels.rms_norm import rms_norm, rms_norm_pdl
    from pixtral_rt.kernels.silu_mul import silu_mul, silu_mul_pdl
    torch.manual_seed(11)
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    g = (1 + 0.1 * torch.randn(5120, device="cuda")).to(torch.bfloat16)
    w = torch.randn(28672, 5120, device="cuda", dtype=torch.bfloat16) * 0.02
    ya, sa = rms_norm(x, g, 1e-5, residual=r)
    a = silu_mul(gemv(ya, w, block_n=16, block_k=256))
    for _ in range(3):
        yb, sb = rms_norm_pdl(x, g, 1e-5, residual=r)
        b = silu_mul_pdl(gemv(yb, w, block_n=16, block_k=256, pdl=True))
        torch.cuda.synchronize()
        assert torch.equal(ya, yb) and torch.equal(sa, sb) and torch.equal(a, b)


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
