"""FP8-weight linear for decode (1..64 rows): bf16 activations, weights dequantised in registers.

    y[m, n] = round( (sum_k x[m, k] * W8[n, k]) * s_w[n] )          (decode; see pixtral_rt/fp8.py)

x (M, K) bf16 / fp16 / fp32, unit last stride; W8 (N, K) float8_e4m3fn row-major (nn.Linear layout); s_w (N,)
fp32; y (M, N) in x's dtype (or out's). fp32 accumulation; the scale is applied once, in the epilogue.
Decode is bound by reading W: one byte per weight instead of bf16's two.

Two kernels, chosen by M:
  M == 1   _fp8_gemv_kernel: the batch-1 GEMV of kernels/gemv.py with fp8 tiles (BLOCK_N rows x BLOCK_K,
           16-byte loads = 16 weights per thread), converted to fp32 and multiplied in registers (no tensor
           cores: 1 row). pdl=True (sm90+): programmatic dependent launch, first W tile loaded before the
           wait on the producer of x (same protocol as gemv(pdl=True), so it slots into the decode chain).
  M >= 2   _fp8_skinny_kernel: tensor-core tiles (BLOCK_M >= 16 rows padded, BLOCK_N, BLOCK_K): the fp8 W tile
           is converted to x's dtype (exact: e4m3 fits bf16 / fp16) and fed to tl.dot with the x tile. With
           BLOCK_M >= M one program column covers every row, so W is read once per step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.fp8 import FP8_DTYPE
from pixtral_rt.kernels.gemv import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PEEL: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_start = 0
    if PEEL:
        # first K tile of W (constant data) loaded before waiting on the producer of x (PDL)
        w0 = tl.load(w_ptrs, mask=nmask[:, None] & (offs_k < K)[None, :], other=0.0)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()   # after the wait: at most one grid waits behind this one
        x0 = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        acc += w0.to(tl.float32) * x0[None, :]
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + offs_k)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
        else:
            kmask = k0 + offs_k < K
            x = tl.load(x_ptr + k0 + offs_k, mask=kmask, other=0.0)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    s = tl.load(s_ptr + offs_n, mask=nmask, other=0.0)
    y = tl.sum(acc, axis=1) * s
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _fp8_skinny_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_w, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask, nmask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]      # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]       # (BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
        else:
            kmask = k0 + offs_k < K
            x = tl.load(x_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    s = tl.load(s_ptr + offs_n, mask=nmask, other=0.0)
    y = acc * s[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# tiles (measured on an H200 by benchmarks/bench_fp8_linear.py; see FP8_GEMV_CONFIGS in pixtral_rt/decoder.py)
GEMV_DEFAULT = dict(block_n=8, block_k=1024, num_warps=4, num_stages=4)
SKINNY_DEFAULT = dict(block_n=64, block_k=128, num_warps=4, num_stages=4)


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
             pdl: bool = False, peel: bool | None = None, block_n: int | None = None, block_k: int | None = None,
             block_m: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """x (M, K) or (K,), w (N, K) float8_e4m3fn, scale (N,) fp32 -> (M, N) (or (N,)) in x's dtype (or out's).
    M == 1: the GEMV kernel (pdl / peel as in kernels/gemv.py); M >= 2: the tensor-core kernel (block_m
    defaults to max(16, next power of two of M), capped at 64). Tile arguments left None take the defaults."""
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1) if squeeze else x
    if w.dim() != 2 or w.dtype != FP8_DTYPE or w.stride(1) != 1 or x2.dim() != 2 or x2.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)} and w {tuple(w.shape)} {w.dtype} (row-major (N, K) "
                         f"float8_e4m3fn) do not match")
    N, K = w.shape
    if scale.numel() != N or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"fp8_gemv: scale must be contiguous fp32 with {N} values, got {tuple(scale.shape)} "
                         f"{scale.dtype}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (M, N) and not (M == 1 and y.numel() == N):
        raise ValueError(f"fp8_gemv: out must be ({M}, {N}), got {tuple(y.shape)}")
    if y.stride(-1) != 1:
        raise ValueError("fp8_gemv: out needs a unit last stride")
    if M == 1:
        cfg = dict(GEMV_DEFAULT)
        cfg.update({k: v for k, v in dict(block_n=block_n, block_k=block_k, num_warps=num_warps,
                                          num_stages=num_stages).items() if v is not None})
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if pdl and not pdl_supported(x.device):
            pdl = False
        extra = dict(launch_pdl=True) if pdl else {}
        bn, bk = cfg["block_n"], cfg["block_k"]
        _fp8_gemv_kernel[(triton.cdiv(N, bn),)](x2, w, scale, y, N, K, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                EVEN_K=K % bk == 0, PEEL=pdl if peel is None else peel, USE_PDL=pdl,
                                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    elif M > 0:
        cfg = dict(SKINNY_DEFAULT)
        cfg.update({k: v for k, v in dict(block_n=block_n, block_k=block_k, num_warps=num_warps,
                                          num_stages=num_stages).items() if v is not None})
        bm = block_m or min(64, max(16, triton.next_power_of_2(M)))
        bn, bk = cfg["block_n"], cfg["block_k"]
        prec = "ieee" if x2.dtype == torch.float32 else "tf32"
        _fp8_skinny_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
            x2, w, scale, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            EVEN_K=K % bk == 0, PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(N) if squeeze else y
