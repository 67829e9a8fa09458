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


# ----------------------------------------------------------------------------- peeled first tile / PDL
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


def test_gemv_fp32_out_and_errors(device):
    """fp32 out: the unrounded dot products; a wrong-sized out or mismatched x is refused."""
    torch.manual_seed(7)
    x = torch.randn(1, 128, device=device, dtype=torch.float16)
    w = torch.randn(50, 128, device=device, dtype=torch.float16) * 0.1
    out = torch.empty(1, 50, device=device, dtype=torch.float32)
    gemv(x, w, out=out, block_k=64)
    ref = x.double() @ w.double().T
    assert rel(out, ref) <= 1e-5
    with pytest.raises(ValueError, match="out"):
        gemv(x, w, out=torch.empty(1, 49, device=device))
    with pytest.raises(ValueError, match="do not match"):
        gemv(x[:, :64], w)


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
