"""FP8 x FP8 GEMM with per-row and per-column scales, for prefill (FP8 tensor cores).

    y[m, n] = round( (sum_k x8[m, k] * W8[n, k]) * s_x[m] * s_w[n] )

x8 (M, K) float8_e4m3fn row-major, s_x (M, 1) fp32 (kernels/fp8_quant.py: per-token dynamic); W8 (N, K)
float8_e4m3fn row-major (nn.Linear layout), s_w (N,) fp32 (per output channel); y (M, N) bf16 (or out's
dtype). fp32 accumulation; both scales applied once in the epilogue. FLOPs: 2 M N K.

Two implementations, same formula:
  backend "scaled_mm"  torch._scaled_mm with row-wise scales (cuBLASLt on sm89+; needs K, N % 16 == 0)
  backend "triton"     _fp8_gemm_kernel below: (BLOCK_M, BLOCK_N) output tiles, grouped launch order for L2
                       reuse of W, tl.dot on fp8 operands (wgmma on sm90), each K tile's partial sum added
                       to an fp32 accumulator. Runs in the interpreter (CI).
benchmarks/bench_fp8_linear.py measures both on the decoder's shapes; pixtral_rt/decoder.py uses the winner.
No autotuning: fixed tiles, so nothing is tuned on the request path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.fp8 import FP8_DTYPE


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr):
    # grouped order: GROUP_M row-tiles sweep the same W column-tiles while they sit in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask, nmask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]      # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]      # (BLOCK_K, BLOCK_N) = W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
            b = tl.load(w_ptrs + k0, mask=nmask[None, :], other=0.0)
        else:
            kmask = k0 + offs_k < K
            a = tl.load(x_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptrs + k0, mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc += tl.dot(a, b)   # each K tile's sum promoted into the fp32 accumulator: Hopper's FP8 MMA
        #                       accumulates with fewer mantissa bits, which over K = 14336 doubled the error
    sx = tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
    y = acc * sx[:, None] * sw[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


TRITON_TILES = dict(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=4)
BACKENDS = ("scaled_mm", "triton")


def _check(x8, sx, w8, sw):
    if x8.dim() != 2 or w8.dim() != 2 or x8.shape[1] != w8.shape[1] or x8.dtype != FP8_DTYPE or w8.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: x8 {tuple(x8.shape)} {x8.dtype} and w8 {tuple(w8.shape)} {w8.dtype} must be "
                         f"(M, K) and (N, K) float8_e4m3fn")
    M, N = x8.shape[0], w8.shape[0]
    if sx.numel() != M or sx.dtype != torch.float32 or sw.numel() != N or sw.dtype != torch.float32:
        raise ValueError(f"fp8_gemm: scales must be fp32 with M={M} and N={N} values, got {tuple(sx.shape)} "
                         f"{sx.dtype} and {tuple(sw.shape)} {sw.dtype}")
    if x8.stride(1) != 1 or w8.stride(1) != 1:
        raise ValueError("fp8_gemm: x8 and w8 need a unit last stride (row-major)")


def fp8_gemm(x8: torch.Tensor, sx: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, out_dtype=torch.bfloat16,
             backend: str = "scaled_mm", out: torch.Tensor | None = None, **tiles) -> torch.Tensor:
    """(M, K) fp8, (M, 1) fp32, (N, K) fp8, (N,) fp32 -> (M, N) out_dtype: (x8 @ w8.T) * sx * sw."""
    _check(x8, sx, w8, sw)
    M, K = x8.shape
    N = w8.shape[0]
    if backend == "scaled_mm":
        # row-wise scaling: scale_a (M, 1), scale_b (1, N); mat2 column-major = w8.T of a row-major w8
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx.reshape(M, 1), scale_b=sw.reshape(1, N), out_dtype=out_dtype)
        if out is not None:
            out.copy_(y)
            return out
        return y
    if backend != "triton":
        raise ValueError(f"fp8_gemm: backend must be one of {BACKENDS}, got {backend!r}")
    y = torch.empty(M, N, dtype=out_dtype, device=x8.device) if out is None else out
    if y.shape != (M, N) or y.stride(1) != 1:
        raise ValueError(f"fp8_gemm: out must be ({M}, {N}) with a unit last stride, got {tuple(y.shape)}")
    t = dict(TRITON_TILES, **tiles)
    bm, bn, bk = t["block_m"], t["block_n"], t["block_k"]
    if M:
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _fp8_gemm_kernel[grid](x8, w8, sx, sw, y, M, N, K, x8.stride(0), w8.stride(0), y.stride(0),
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=t["group_m"], EVEN_K=K % bk == 0,
                               num_warps=t["num_warps"], num_stages=t["num_stages"])
    return y
