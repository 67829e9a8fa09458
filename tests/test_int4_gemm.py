"""kernels/int4_gemm.py (int4-weight tensor-core GEMM: skinny decode batches and prefill; the "triton" and
"dequant" backends) against the exact formula in float64. Tolerance as for the GEMV: the kernel's error <= 2x
torch's own same-dtype error (+ eps). Shapes: M and N not multiples of the tiles (several m-tiles: the grouped
launch order), several groups per row, plane widths 16 / 32 / 128, a strided x; outputs poisoned with NaN."""
import pytest
import torch

from pixtral_rt.kernels.int4_gemm import int4_gemm
from tests.conftest import requires_gpu
from tests.helpers import int4_weights, rel


def check_gemm(device, dtype, M, N, K, group_size=128, backend="triton", strided=False, **cfg):
    torch.manual_seed(M * 7 + N)
    x = torch.randn(M, K + (8 if strided else 0), device=device, dtype=dtype)[:, :K]
    w, W = int4_weights(N, K, device, N + K, group_size)
    out = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    int4_gemm(x, w, out=out, backend=backend, **cfg)
    ref = x.double() @ W.double().T
    torch_same_dtype = x @ W.to(dtype).T
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(torch_same_dtype, ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("M,N,K,group_size,cfg", [
    (2, 37, 384, 128, dict(block_n=16)),                     # plane 16, 3 groups
    (5, 70, 256, 32, dict(block_n=32)),                      # plane 32, 8 groups
    (17, 64, 1024, 128, dict(block_n=32)),                   # plane 128, block_m 32
    (64, 40, 512, 64, dict(block_n=16)),
    (1, 33, 256, 128, dict(block_n=16)),                     # the tensor-core kernel at M = 1 (padded)
    (70, 24, 256, 128, dict(block_m=32, block_n=16, group_m=2)),   # prefill-sized: 3 m-tiles, grouped order
    (130, 50, 384, 128, dict(block_m=64, block_n=32, group_m=8, num_warps=8)),
    (9, 40, 2048, 128, dict(block_n=16, block_p=32)),        # a plane of 128 word columns walked in 4 steps
    (33, 24, 512, 32, dict(block_n=16, block_p=16)),         # plane 32 in 2 steps
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_gemm_small(device, dtype, M, N, K, group_size, cfg):
    check_gemm(device, dtype, M, N, K, group_size, **cfg)


def test_int4_gemm_strided_input_and_default_tiles(device):
    check_gemm(device, torch.float32, 9, 45, 384, strided=True)
    check_gemm(device, torch.float16, 66, 19, 256, block_m=32, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_gemm_dequant_backend(device, dtype):
    check_gemm(device, dtype, 70, 37, 384, backend="dequant")


def test_int4_gemm_rejects_bad_inputs(device):
    w, _ = int4_weights(8, 256, device, 0)
    with pytest.raises(ValueError, match="128 inputs but the weight .8, 256. takes 256"):
        int4_gemm(torch.randn(3, 128, device=device), w)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        int4_gemm(torch.randn(256, device=device), w)
    with pytest.raises(ValueError, match="block_p"):
        int4_gemm(torch.randn(3, 256, device=device), w, block_p=24)
    with pytest.raises(ValueError, match="backend"):
        int4_gemm(torch.randn(3, 256, device=device), w, backend="marlin")
    with pytest.raises(ValueError, match="out must be"):
        int4_gemm(torch.randn(3, 256, device=device), w, out=torch.empty(3, 9, device=device))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (97, 1024)])
@pytest.mark.parametrize("M", [1, 2, 7, 16, 33, 64, 512, 1000])
def test_int4_gemm_bf16(M, N, K):
    check_gemm("cuda", torch.bfloat16, M, N, K)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M,cfg", [(16, dict(block_p=32)), (64, dict(block_p=64, block_n=128, num_warps=8, num_stages=2)),
                                   (64, dict(block_p=32, block_n=64, num_warps=4, num_stages=2))])
def test_int4_gemm_block_p_bf16(M, cfg):
    check_gemm("cuda", torch.bfloat16, M, 28672, 5120, **cfg)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [512, 4096])
def test_int4_gemm_dequant_bf16(M):
    check_gemm("cuda", torch.bfloat16, M, 5120, 14336, backend="dequant")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 512])
def test_int4_gemm_extreme_nibbles_bf16(M):
    """bf16 activations on CUDA take the inline-PTX planes (lop3 + bf16x2 fma): every nibble 0 (q = -8) or 15
    (q = 7) in every position, against the exact product."""
    w, _ = int4_weights(96, 5120, "cuda", 7)
    x = torch.randn(M, 5120, device="cuda", dtype=torch.bfloat16)
    for fill, q in ((0, -8.0), (-1, 7.0)):
        ext = type(w)(torch.full_like(w.qweight, fill), w.scale, w.group_size, w.plane)
        W = q * ext.scale.double().repeat_interleave(w.group_size, 1)
        ref = x.double() @ W.T
        y = int4_gemm(x, ext)
        assert rel(y, ref) <= 2 * rel(x @ W.to(torch.bfloat16).T, ref) + 1e-6
