"""Dynamic per-token FP8 (e4m3) quantisation of activations, the input side of the prefill FP8 GEMM.

    s[t]     = max(max_k |x[t, k]|, EPS) * fp32(1/448)         (T, 1) fp32
    x8[t, k] = e4m3(clamp(x[t, k] / s[t], -448, 448))           (T, K) float8_e4m3fn, round to nearest even
                                                                (rounded in fp32 by _round_e4m3, then cast)

x (T, K) bf16 / fp16 / fp32 with a unit last stride. x / s is correctly rounded (div_rn), so the bytes equal
pixtral_rt.fp8.quantize_activations (torch's fp32 `/` and `.to(float8_e4m3fn)`), on the CPU and the GPU.
Grid: (T,): one program per token row. K <= 16384: the row is loaded once and kept in registers (one pass);
longer rows (Pixtral-Large's w2 input, 28672) take two passes (amax, then scale + store; the second read
mostly hits L2). Memory-bound: reads 2 bytes and writes 1 per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.fp8 import EPS, FP8_DTYPE, FP8_MAX, INV_FP8_MAX
from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _round_e4m3(v):
    """fp32 v, |v| <= 448 -> the nearest e4m3 value (ties to even), still fp32. The conversion that follows
    is then exact; done by hand because the Triton interpreter's fp32 -> fp8 cast rounds wrongly (31 -> 16),
    and the CPU tests run there. Spacing of e4m3 around v: 2^(e - 3), e = max(exponent(v), -6) (subnormals
    below 2^-6 step by 2^-9); |v| / spacing < 16, so adding and removing 1.5 * 2^23 rounds it to an integer
    (ties to even) in fp32."""
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = ((a / step + 12582912.0) - 12582912.0) * step
    return tl.where(v < 0, -r, r)


@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps, fmax, inv_fmax, BLOCK_K: tl.constexpr,
                      ONE_PASS: tl.constexpr, USE_PDL: tl.constexpr = False):
    if USE_PDL:      # decode chain: wait for the producer of x, then let the consumer (the GEMM) launch
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:      # the whole row in registers (BLOCK_K >= K)
        m = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), eps) * inv_fmax
        q = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fmax), fmax))
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + row, scale)
        return
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), eps) * inv_fmax
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fmax), fmax))
        tl.store(q_ptr + row * stride_q + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)


def fp8_quant(x: torch.Tensor, out: torch.Tensor | None = None, scale: torch.Tensor | None = None,
              block_k: int | None = None, num_warps: int | None = None, pdl: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (x8 (T, K) float8_e4m3fn, s (T, 1) fp32). out / scale: preallocated outputs.
    block_k: default the whole row (one pass) up to 16384, else 4096-wide chunks (two passes).
    pdl (sm90+): a programmatic dependent launch (the decode chain, kernels/pdl.py); same bytes."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"fp8_quant: x must be (T, K) with a unit last stride, got {tuple(x.shape)} {x.stride()}")
    T, K = x.shape
    q = torch.empty(T, K, dtype=FP8_DTYPE, device=x.device) if out is None else out
    s = torch.empty(T, 1, dtype=torch.float32, device=x.device) if scale is None else scale
    if q.shape != (T, K) or q.dtype != FP8_DTYPE or q.stride(1) != 1:
        raise ValueError(f"fp8_quant: out must be ({T}, {K}) float8_e4m3fn, got {tuple(q.shape)} {q.dtype}")
    if s.numel() != T or s.dtype != torch.float32 or not s.is_contiguous():
        raise ValueError(f"fp8_quant: scale must be contiguous fp32 with {T} values, got {tuple(s.shape)} {s.dtype}")
    if T:
        full = triton.next_power_of_2(K)
        block_k = min(block_k or (full if full <= 16384 else 4096), full)
        num_warps = num_warps or max(4, min(16, block_k // 1024))
        extra = dict(USE_PDL=True, launch_pdl=True) if pdl and pdl_supported(x.device) else {}
        _fp8_quant_kernel[(T,)](x, q, s, K, x.stride(0), q.stride(0), EPS, FP8_MAX, INV_FP8_MAX, BLOCK_K=block_k,
                                ONE_PASS=block_k >= K, num_warps=num_warps, **extra)
    return q, s
