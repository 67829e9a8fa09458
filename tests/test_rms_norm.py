"""rms_norm (kernels/rms_norm.py) vs the reference RMSNorm: plain and fused residual add."""
import pytest
import torch

from pixtral_rt.kernels.rms_norm import rms_norm
from tests.conftest import requires_gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ref_norm(x, w, eps):  # the reference module's math (pixtral_rt/reference/layers.py) in x's dtype
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def check(device, dtype, rows, n, residual):
    torch.manual_seed(rows * 31 + n)
    x = torch.randn(rows, n, device=device, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    r = torch.randn(rows, n, device=device, dtype=dtype) if residual else None
    y = torch.full_like(x, float("nan"))
    if residual:
        s = torch.full_like(x, float("nan"))
        rms_norm(x, w, 1e-5, residual=r, out=y, residual_out=s)
        s_ref = x + r  # torch's same-dtype add is the contract for the residual stream
        assert torch.equal(s, s_ref)
        inp = s_ref
    else:
        rms_norm(x, w, 1e-5, out=y)
        inp = x
    ref32 = ref_norm(inp.float(), w.float(), 1e-5)
    err = rel(y, ref32)
    err_torch = rel(ref_norm(inp, w, 1e-5), ref32)
    assert not torch.isnan(y).any()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("rows,n", [(1, 256), (7, 1000), (3, 5120)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("quant", [False, True], ids=["plain", "quant"])
def test_rms_norm(device, dtype, rows, n, residual, quant):
    (check_quant if quant else check)(device, dtype, rows, n, residual)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,n", [(1, 5120), (97, 5120), (4097, 1024)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_bf16(rows, n, residual):
    check("cuda", torch.bfloat16, rows, n, residual)


def test_rms_norm_shape_errors(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(4, device=device), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=device), 1e-5, residual=torch.randn(3, 8, device=device))


def check_quant(device, dtype, rows, n, residual, pdl=False):
    """quant=True: the same e4m3 values and scales as rms_norm followed by fp8_quant (fp8_quant is tested
    against pixtral_rt.fp8.quantize_activations), the residual stream unchanged; outputs poisoned first."""
    from pixtral_rt.fp8 import FP8_DTYPE
    from pixtral_rt.kernels.fp8_quant import fp8_quant
    from pixtral_rt.kernels.rms_norm import rms_norm_pdl
    torch.manual_seed(rows * 7 + n)
    x = torch.randn(rows, n, device=device, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    r = torch.randn(rows, n, device=device, dtype=dtype) if residual else None
    q = torch.full((rows, n), float("nan"), device=device).to(FP8_DTYPE)
    got = rms_norm_pdl(x, w, 1e-5, residual=r, out=q, pdl=pdl, quant=True)
    want = rms_norm(x, w, 1e-5, residual=r)
    if residual:
        (q8, s), res = got
        y, res_ref = want
        assert torch.equal(res, res_ref)
    else:
        (q8, s), y = got, want
    q_ref, s_ref = fp8_quant(y)
    assert q8 is q and torch.equal(s, s_ref)
    assert torch.equal(q8.float(), q_ref.float())     # values (a signed zero may differ on the GPU: fp8_quant's test)



@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("pdl", [False, True])
def test_rms_norm_quant_bf16(rows, pdl):
    check_quant("cuda", torch.bfloat16, rows, 5120, True, pdl)
