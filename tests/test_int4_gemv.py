"""kernels/int4_gemv.py (int4-weight GEMV for batch-1 decode) against the exact formula in float64 (W = q * s
dequantised exactly). Tolerance: the kernel's error <= 2x torch's own same-dtype error on the same formula
(+ a tiny epsilon): q * s is exact, so only accumulation order and the final rounding differ. Shapes: N not a
multiple of the row block, several groups per row, plane widths 16 / 32 / 128; outputs poisoned with NaN."""
import pytest
import torch

from pixtral_rt.kernels.int4_gemv import int4_gemv
from tests.conftest import requires_gpu
from tests.helpers import int4_weights, rel


def check_gemv(device, dtype, N, K, group_size=128, scale_dtype=None, **cfg):
    torch.manual_seed(N * 3 + K)
    x = torch.randn(1, K, device=device, dtype=dtype)
    w, W = int4_weights(N, K, device, N + K, group_size, scale_dtype)
    out = torch.full((1, N), float("nan"), device=device, dtype=dtype)
    int4_gemv(x, w, out=out, **cfg)
    ref = x.double() @ W.double().T
    torch_same_dtype = x @ W.to(dtype).T
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(torch_same_dtype, ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("N,K,group_size,cfg", [
    (37, 384, 128, dict(block_n=8)),                 # plane 16, 3 groups, N % 8 != 0
    (70, 256, 32, dict(block_n=16)),                 # plane 32, 8 groups of 32
    (1, 1024, 128, dict(block_n=4)),                 # one row, plane 128
    (33, 2048, 128, dict(block_n=16, peel=True)),    # the PDL structure (first block peeled), 2 blocks
    (97, 512, 64, dict(block_n=32, peel=True)),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_gemv_small(device, dtype, N, K, group_size, cfg):
    check_gemv(device, dtype, N, K, group_size, **cfg)


def test_int4_gemv_half_scales_and_vector_input(device):
    """fp16 scales (narrowed where exact) and a (K,) input."""
    check_gemv(device, torch.float32, 45, 384, scale_dtype=torch.float16, block_n=16)
    w, W = int4_weights(9, 256, device, 4)
    x = torch.randn(256, device=device)
    y = int4_gemv(x, w, block_n=4)
    assert y.shape == (9,)
    torch.testing.assert_close(y.double(), W.double() @ x.double(), rtol=1e-5, atol=1e-6)


def test_int4_gemv_peeled_equals_plain(device):
    torch.manual_seed(3)
    x = torch.randn(1, 2048, device=device)
    w, _ = int4_weights(37, 2048, device, 1)
    a = int4_gemv(x, w, block_n=8)
    b = int4_gemv(x, w, block_n=8, peel=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_int4_gemv_rejects_bad_inputs(device):
    w, _ = int4_weights(8, 256, device, 0)
    with pytest.raises(ValueError, match="255 inputs but the weight .8, 256. takes 256"):
        int4_gemv(torch.randn(1, 255, device=device), w)
    with pytest.raises(ValueError, match="one row"):
        int4_gemv(torch.randn(2, 256, device=device), w)
    with pytest.raises(ValueError, match="Int4Weight"):
        int4_gemv(torch.randn(1, 256, device=device), torch.zeros(8, 32, dtype=torch.int32))
    bad = type(w)(w.qweight, w.scale[:, :1].contiguous(), w.group_size, w.plane)
    with pytest.raises(ValueError, match="scale must be"):
        int4_gemv(torch.randn(1, 256, device=device), bad)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (97, 1024)])
def test_int4_gemv_bf16(N, K):
    check_gemv("cuda", torch.bfloat16, N, K, scale_dtype=torch.bfloat16)


@requires_gpu
@pytest.mark.gpu
def test_int4_gemv_pdl_equals_plain():
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    w, _ = int4_weights(6144, 5120, "cuda", 2, scale_dtype=torch.bfloat16)
    assert torch.equal(int4_gemv(x, w), int4_gemv(x, w, pdl=True))
