"""kernels/int4_dequant.py: W = q * s from the kernel layout, exactly (fp32, and fp16 where q * s fits),
against pixtral_rt/int4.py's plain dequantisation of the checkpoint packing; N not a multiple of the row block,
several blocks and groups; the output poisoned with NaN."""
import pytest
import torch

from pixtral_rt.kernels.int4_dequant import int4_dequantize
from tests.conftest import requires_gpu
from tests.helpers import int4_weights


@pytest.mark.parametrize("N,K,group_size", [(37, 384, 128), (70, 256, 32), (5, 2048, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_dequantize_exact(device, dtype, N, K, group_size):
    w, W = int4_weights(N, K, device, N, group_size)
    out = torch.full((N, K), float("nan"), device=device, dtype=dtype)
    int4_dequantize(w, dtype, out=out, block_n=16)
    assert torch.equal(out.float(), W)      # q (4 bits) * s (a bf16 value) fits fp16's 11-bit mantissa here
    assert torch.equal(int4_dequantize(w, dtype), out)


@requires_gpu
@pytest.mark.gpu
def test_int4_dequantize_bf16_is_one_rounding():
    w, W = int4_weights(6144, 5120, "cuda", 1, scale_dtype=torch.bfloat16)
    assert torch.equal(int4_dequantize(w, torch.bfloat16), W.to(torch.bfloat16))
