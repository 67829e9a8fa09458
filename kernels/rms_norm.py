"""RMSNorm with fp32 math, optionally fused with the residual add that precedes it.

    s = x + residual                      (rounded to x's dtype: this is the new residual stream)
    y = s / sqrt(mean(s^2) + eps) * weight   (fp32 math, rounded once to x's dtype)

Shapes: x, residual (..., N) with a contiguous last dim; weight (N,). One program per row; the whole row
(N <= 16384 here: 5120 text, 1024/1408 vision) sits in registers, so x is read once and y written once.

    y = rms_norm(x, weight, eps)                       # plain
    y, s = rms_norm(x, weight, eps, residual=r)        # fused add: s = x + r, y = norm(s)
rms_norm_pdl(...): the same, as a programmatic dependent launch (sm90+; decode chain, see pixtral_rt/decoder.py).
quant=True (the input of an FP8 linear): y is rounded to x's dtype, then quantised per row to e4m3 as
kernels/fp8_quant.py does (s_y = max(max|y|, EPS) / 448, y8 = e4m3(y / s_y)): returns (y8, s_y) in place of
y, the same bytes as rms_norm followed by fp8_quant, in one kernel.
`out=` / `residual_out=` let a caller (a CUDA graph) reuse buffers; `residual_out` may alias `residual`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.fp8 import EPS, FP8_DTYPE, FP8_MAX, INV_FP8_MAX
from pixtral_rt.kernels.fp8_quant import _round_e4m3
from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, q_s_ptr, N, eps,
                     stride_x, stride_r, stride_y, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
                     QUANT: tl.constexpr = False, q_eps=1e-12, fmax=448.0, inv_fmax=1.0 / 448.0):
    if USE_PDL:  # wait for the producer first, then let the consumer launch (it preloads its weights)
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)  # the residual stream keeps the model dtype, like torch's add
        tl.store(s_ptr + row * stride_s + offs, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:        # y in x's dtype (as the unfused norm writes it), then e4m3 per row (kernels/fp8_quant.py)
        y = (x * rstd * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), q_eps) * inv_fmax
        q = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -fmax), fmax))
        tl.store(y_ptr + row * stride_y + offs, q.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(q_s_ptr + row, scale)
    else:
        tl.store(y_ptr + row * stride_y + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    if t.shape[-1] != n:
        raise ValueError(f"rms_norm: {name} has last dim {t.shape[-1]}, expected {n}")
    if t.stride(-1) != 1:
        raise ValueError(f"rms_norm: {name} needs a contiguous last dim (stride {t.stride(-1)})")
    return t.reshape(-1, n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """x (..., N), weight (N,) -> y (..., N); with residual (..., N): returns (y, x + residual)."""
    return rms_norm_pdl(x, weight, eps, residual, out, residual_out, pdl=False)


def rms_norm_pdl(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, pdl: bool = True,
                 quant: bool = False):
    """rms_norm launched as a programmatic dependent launch when pdl and sm90+ (decode chain); same results.
    quant: y as (y8 float8_e4m3fn (..., N), s_y (rows, 1) fp32), see the module docstring."""
    if weight.dim() != 1:
        raise ValueError(f"rms_norm: weight must be 1-D, got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    if x.shape[-1] != N:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]}, weight has {N}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _rows(x.contiguous() if x.stride(-1) != 1 else x, "x", N)
    y = (torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device) if quant else torch.empty_like(x)) if out is None else out
    y2 = _rows(y, "out", N)
    M = x2.shape[0]
    qs = torch.empty(M, 1, dtype=torch.float32, device=x.device) if quant else y2
    if quant:
        if y.dtype != FP8_DTYPE:
            raise ValueError(f"rms_norm: quant=True writes float8_e4m3fn, out is {y.dtype}")
        extra_q = dict(QUANT=True, q_eps=EPS, fmax=FP8_MAX, inv_fmax=INV_FP8_MAX)
    else:
        extra_q = {}
    y_ret = (y, qs) if quant else y
    BLOCK_N = triton.next_power_of_2(N)
    num_warps = 4 if BLOCK_N <= 2048 else (8 if BLOCK_N <= 8192 else 16)
    pdl = pdl and pdl_supported(x.device)
    extra = dict(USE_PDL=True, launch_pdl=True) if pdl else {}
    if residual is None:
        _rms_norm_kernel[(M,)](x2, x2, weight, y2, y2, qs, N, eps, x2.stride(0), 0, y2.stride(0), 0,
                               HAS_RESIDUAL=False, BLOCK_N=BLOCK_N, num_warps=num_warps, **extra, **extra_q)
        return y_ret
    r2 = _rows(residual, "residual", N)
    s = torch.empty_like(x) if residual_out is None else residual_out
    s2 = _rows(s, "residual_out", N)
    _rms_norm_kernel[(M,)](x2, r2, weight, y2, s2, qs, N, eps, x2.stride(0), r2.stride(0), y2.stride(0),
                           s2.stride(0), HAS_RESIDUAL=True, BLOCK_N=BLOCK_N, num_warps=num_warps, **extra, **extra_q)
    return y_ret, s
