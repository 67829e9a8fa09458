"""RMSNorm with fp32 math, optionally fused with the residual add that precedes it.

    s = x + residual                      (rounded to x's dtype: this is the new residual stream)
    y = s / sqrt(mean(s^2) + eps) * weight   (fp32 math, rounded once to x's dtype)

Shapes: x, residual (..., N) with a contiguous last dim; weight (N,). One program per row; the whole row
(N <= 16384 here: 5120 text, 1024/1408 vision) sits in registers, so x is read once and y written once.

    y = rms_norm(x, weight, eps)                       # plain
    y, s = rms_norm(x, weight, eps, residual=r)        # fused add: s = x + r, y = norm(s)
rms_norm_pdl(...): the same, as a programmatic dependent launch (sm90+; decode chain, see pixtral_rt/decoder.py).
`out=` / `residual_out=` let a caller (a CUDA graph) reuse buffers; `residual_out` may alias `residual`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.gemv import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, N, eps,
                     stride_x, stride_r, stride_y, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False):
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
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, pdl: bool = True):
    """rms_norm launched as a programmatic dependent launch when pdl and sm90+ (decode chain); same results."""
    if weight.dim() != 1:
        raise ValueError(f"rms_norm: weight must be 1-D, got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    if x.shape[-1] != N:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]}, weight has {N}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _rows(x.contiguous() if x.stride(-1) != 1 else x, "x", N)
    y = torch.empty_like(x) if out is None else out
    y2 = _rows(y, "out", N)
    M = x2.shape[0]
    BLOCK_N = triton.next_power_of_2(N)
    num_warps = 4 if BLOCK_N <= 2048 else (8 if BLOCK_N <= 8192 else 16)
    pdl = pdl and pdl_supported(x.device)
    extra = dict(USE_PDL=True, launch_pdl=True) if pdl else {}
    if residual is None:
        _rms_norm_kernel[(M,)](x2, x2, weight, y2, y2, N, eps, x2.stride(0), 0, y2.stride(0), 0,
                               HAS_RESIDUAL=False, BLOCK_N=BLOCK_N, num_warps=num_warps, **extra)
        return y
    r2 = _rows(residual, "residual", N)
    s = torch.empty_like(x) if residual_out is None else residual_out
    s2 = _rows(s, "residual_out", N)
    _rms_norm_kernel[(M,)](x2, r2, weight, y2, s2, N, eps, x2.stride(0), r2.stride(0), y2.stride(0),
                           s2.stride(0), HAS_RESIDUAL=True, BLOCK_N=BLOCK_N, num_warps=num_warps, **extra)
    return y, s
