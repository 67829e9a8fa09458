"""Int4 weight dequantisation: the dense (N, K) matrix of an Int4Weight, for prefill through cuBLAS.

    W[n, k] = q[n, k] * s[n, k // G]          (pixtral_rt/int4.py), written in `dtype`

w an Int4Weight: qweight (N, K / 8) int32 in the KERNEL layout, scale (N, K / G) fp32 or bf16; out (N, K) in
`dtype` (bf16 / fp16 / fp32; exact in fp32, one rounding of q * s otherwise). Grid (cdiv(N, BLOCK_N),
K / 8P): each program reads one (BLOCK_N, P) tile of words (one block of 8P inputs) and writes its 8
planes, plane i to columns k0 + i P .. k0 + (i + 1) P - 1 (contiguous). Bytes: N K / 2 read, N K * 2 written
(bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.int4 import Int4Weight, check_kernel_weight


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, out_ptr, N, stride_w, stride_s, stride_o, BLOCK_N: tl.constexpr,
                         PLANE: tl.constexpr, GROUP: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, PLANE)
    nmask = offs_n < N
    words = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_w + b * PLANE + offs_j[None, :],
                    mask=nmask[:, None], other=0)                                   # (BLOCK_N, P)
    k0 = b * 8 * PLANE
    o_rows = out_ptr + offs_n[:, None].to(tl.int64) * stride_o
    for i in tl.static_range(8):
        u = (words >> (4 * i)) & 0xF
        q = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0               # exact q = u - 8
        s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_s + (k0 + i * PLANE) // GROUP, mask=nmask,
                    other=0.0).to(tl.float32)
        tl.store(o_rows + k0 + i * PLANE + offs_j[None, :], (q * s[:, None]).to(out_ptr.dtype.element_ty),
                 mask=nmask[:, None])


def int4_dequantize(w: Int4Weight, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
                    block_n: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Int4Weight (N, K) -> W (N, K) in `dtype` (or out's)."""
    N, K = w.shape
    check_kernel_weight(w, K, "int4_dequantize")
    y = torch.empty(N, K, dtype=dtype, device=w.qweight.device) if out is None else out
    if y.shape != (N, K) or y.stride(1) != 1:
        raise ValueError(f"int4_dequantize: out must be ({N}, {K}) with a unit last stride, got {tuple(y.shape)}")
    grid = (triton.cdiv(N, block_n), K // (8 * w.plane))
    _int4_dequant_kernel[grid](w.qweight, w.scale, y, N, w.qweight.stride(0), w.scale.stride(0), y.stride(0),
                               BLOCK_N=block_n, PLANE=w.plane, GROUP=w.group_size, num_warps=num_warps)
    return y
