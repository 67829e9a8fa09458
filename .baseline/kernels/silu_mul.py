"""SwiGLU gate on the output of the fused w13 GEMM (w13 = cat([w1, w3]) along the output dim).

    x13 (..., 2H) = [x @ w1.T | x @ w3.T]  ->  out (..., H) = silu(x13[..., :H]) * x13[..., H:]

fp32 math, rounded once to x13's dtype. Grid: (rows, cdiv(H, BLOCK)); H = 14336 (Pixtral-12B text).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.gemv import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _silu_mul_kernel(x_ptr, o_ptr, H, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + H + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(o_ptr + row * stride_o + offs, y.to(o_ptr.dtype.element_ty), mask=mask)


def silu_mul(x13: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x13 (..., 2H) -> (..., H): silu(gate) * up, gate = first half."""
    return silu_mul_pdl(x13, out, pdl=False)


def silu_mul_pdl(x13: torch.Tensor, out: torch.Tensor | None = None, pdl: bool = True) -> torch.Tensor:
    """silu_mul as a programmatic dependent launch when pdl and sm90+ (decode chain); same results."""
    if x13.shape[-1] % 2:
        raise ValueError(f"silu_mul: x13 last dim {x13.shape[-1]} is odd; expected 2 * hidden")
    if x13.stride(-1) != 1:
        x13 = x13.contiguous()
    H = x13.shape[-1] // 2
    x2 = x13.reshape(-1, 2 * H)
    o = torch.empty(*x13.shape[:-1], H, dtype=x13.dtype, device=x13.device) if out is None else out
    if o.shape[-1] != H or o.stride(-1) != 1:
        raise ValueError(f"silu_mul: out must be (..., {H}) with a contiguous last dim, got {tuple(o.shape)}")
    o2 = o.view(-1, H)
    M = x2.shape[0]
    BLOCK = 1024
    extra = dict(USE_PDL=True, launch_pdl=True) if pdl and pdl_supported(x13.device) else {}
    _silu_mul_kernel[(M, triton.cdiv(H, BLOCK))](x2, o2, H, x2.stride(0), o2.stride(0), BLOCK=BLOCK, num_warps=4,
                                                 **extra)
    return o
