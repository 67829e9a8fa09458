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
@pytest.mark.parametrize("vec", [0, 4, 8])        # 0: the 2-D plane kernel; 4 / 8: the 3-D one (in-place nibbles)
def test_int4_gemv_small(device, dtype, N, K, group_size, cfg, vec):
    check_gemv(device, dtype, N, K, group_size, vec=vec, **cfg)


def test_int4_gemv_v_one_warp_rows(device):
    """The decode tiles of the 3-D kernel (one warp, a few rows each) and every nibble position used: a weight
    whose nibbles are all 0 or all 15 (q = -8 / 7) checks the in-place extraction at its extremes."""
    torch.manual_seed(11)
    check_gemv(device, torch.float32, 13, 1024, block_n=4, num_warps=1, vec=4)
    w, W = int4_weights(5, 1024, device, 3)
    for fill in (0, -1):                                  # every nibble 0 (q = -8) / 15 (q = 7)
        ext = type(w)(torch.full_like(w.qweight, fill), w.scale, w.group_size, w.plane)
        x = torch.randn(1, 1024, device=device)
        y = int4_gemv(x, ext, block_n=2, vec=4)
        q = -8.0 if fill == 0 else 7.0
        ref = (x.double() @ (q * ext.scale.double().repeat_interleave(w.group_size, 1)).T)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_int4_gemv_half_scales_and_vector_input(device):
    """fp16 scales (narrowed where exact) and a (K,) input."""
    check_gemv(device, torch.float32, 45, 384, scale_dtype=torch.float16, block_n=16)
    w, W = int4_weights(9, 256, device, 4)
    x = torch.randn(256, device=device)
    y = int4_gemv(x, w, block_n=4)
    assert y.shape == (9,)
    torch.testing.assert_close(y.double(), W.double() @ x.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vec", [0, 4])
def test_int4_gemv_peeled_equals_plain(device, vec):
    torch.manual_seed(3)
    x = torch.randn(1, 2048, device=device)
    w, _ = int4_weights(37, 2048, device, 1)
    a = int4_gemv(x, w, block_n=8, vec=vec)
    b = int4_gemv(x, w, block_n=8, peel=True, vec=vec)
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
    with pytest.raises(ValueError, match="vec must be"):
        int4_gemv(torch.randn(1, 256, device=device), w, vec=3)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (97, 1024)])
@pytest.mark.parametrize("cfg", [{}, dict(vec=4, block_n=4, num_warps=1), dict(vec=4, block_n=8, num_warps=2)])
def test_int4_gemv_bf16(N, K, cfg):
    """On the GPU the 3-D kernel takes its nibbles with inline PTX (lop3): checked here, not on the CPU."""
    check_gemv("cuda", torch.bfloat16, N, K, scale_dtype=torch.bfloat16, **cfg)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("vec", [0, 4])
def test_int4_gemv_pdl_equals_plain(vec):
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    w, _ = int4_weights(6144, 5120, "cuda", 2, scale_dtype=torch.bfloat16)
    cfg = dict(vec=vec, block_n=4, num_warps=1) if vec else {}
    assert torch.equal(int4_gemv(x, w, **cfg), int4_gemv(x, w, pdl=True, **cfg))


@requires_gpu
@pytest.mark.gpu
def test_int4_gemv_v_extreme_nibbles_gpu():
    """The inline-PTX nibble extraction at q = -8 and q = 7 in every position (all-0 and all-15 words)."""
    w, _ = int4_weights(64, 5120, "cuda", 5, scale_dtype=torch.bfloat16)
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    for fill, q in ((0, -8.0), (-1, 7.0)):
        ext = type(w)(torch.full_like(w.qweight, fill), w.scale, w.group_size, w.plane)
        ref = x.double() @ (q * ext.scale.double().repeat_interleave(w.group_size, 1)).T
        y = int4_gemv(x, ext, vec=4, block_n=4, num_warps=1)
        assert rel(y, ref) <= 2 * rel((x.float() @ (q * ext.scale.float().repeat_interleave(w.group_size, 1)).T
                                       ).to(torch.bfloat16), ref) + 1e-6
