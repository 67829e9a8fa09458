"""silu_mul (kernels/silu_mul.py) vs torch: silu(gate) * up on the fused w13 output."""
import pytest
import torch
import torch.nn.functional as F

from pixtral_rt.kernels.silu_mul import silu_mul
from tests.conftest import requires_gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(device, dtype, rows, h):
    torch.manual_seed(rows + h)
    x13 = torch.randn(rows, 2 * h, device=device, dtype=dtype) * 2
    out = torch.full((rows, h), float("nan"), device=device, dtype=dtype)
    silu_mul(x13, out=out)
    g, u = x13.float().chunk(2, -1)
    ref32 = F.silu(g) * u
    g16, u16 = x13.chunk(2, -1)
    err_torch = rel(F.silu(g16) * u16, ref32)
    assert not torch.isnan(out).any()
    assert rel(out, ref32) <= 2 * err_torch + 1e-6


@pytest.mark.parametrize("rows,h", [(1, 512), (7, 1000), (3, 3000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_silu_mul(device, dtype, rows, h):
    check(device, dtype, rows, h)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,h", [(1, 14336), (97, 14336), (1025, 4096)])
def test_silu_mul_bf16(rows, h):
    check("cuda", torch.bfloat16, rows, h)


def test_silu_mul_odd(device):
    with pytest.raises(ValueError, match="odd"):
        silu_mul(torch.randn(2, 7, device=device))
