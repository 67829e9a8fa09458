"""Batch-1 GEMV for decode: y (1, N) = x (1, K) @ W.T, W (N, K) row-major (nn.Linear layout), bf16 in,
fp32 accumulate. Candidate replacement for cuBLAS at M=1, kept only if it reads weights faster
(benchmarks/bench_decode_step.py measures both on every decoder shape).

Grid: cdiv(N, BLOCK_N) programs; each streams its BLOCK_N rows of W in (BLOCK_N, BLOCK_K) tiles along K
(16-byte vector loads, coalesced), keeps a (BLOCK_N, BLOCK_K) fp32 partial and reduces it once at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + offs_k)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
        else:
            kmask = k0 + offs_k < K
            x = tl.load(x_ptr + k0 + offs_k, mask=kmask, other=0.0)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x (1, K) or (K,), w (N, K) -> (1, N) (or (N,)) in x's dtype."""
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1)
    if x2.shape[1] != w.shape[1] or w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (row-major (N, K)) do not match")
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    N, K = w.shape
    y = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    _gemv_kernel[(triton.cdiv(N, block_n),)](x2, w, y, N, K, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             EVEN_K=K % block_k == 0, num_warps=num_warps, num_stages=num_stages)
    return y.view(N) if squeeze else y
