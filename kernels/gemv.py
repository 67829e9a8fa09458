"""Batch-1 GEMV for decode: y (1, N) = x (1, K) @ W.T, W (N, K) row-major (nn.Linear layout), bf16 in,
fp32 accumulate. Candidate replacement for cuBLAS at M=1, kept only if it reads weights faster
(measured against it on the decoder's shapes in benchmarks/results/decode_step.jsonl; tiles per shape:
benchmarks/sweep_gemv_tp.py).

Grid: cdiv(N, BLOCK_N) programs; each streams its BLOCK_N rows of W in (BLOCK_N, BLOCK_K) tiles along K
(16-byte vector loads, coalesced), keeps a (BLOCK_N, BLOCK_K) fp32 partial and reduces it once at the end.

pdl=True (sm90+): launched as a programmatic dependent launch: the first weight tile (constant) is loaded,
then the kernel waits on the previous grid (griddepcontrol.wait) before touching x, then lets the next launch
begin. On the decode chain ('none+pdl'): +4.2% tok/s at 1k, +3.8% at 4k (H200, benchmarks/results/decode_step.jsonl).
Removed after losing their measurements (same file, 2026-11-22; docs/NOTES.md): gemv_fused (RMSNorm / SiLU-mul
prologue, residual epilogue: wqkv+norm 0.88x, w2+silu 0.81x the plain GEMV; decode step -6% 'fused', -7%
'pdl') and the GLU epilogue (w13 with SiLU-mul; 'fused2' +0.9% over 'none' at 1k and 4k, 'fused2+pdl' +4.4%
at 1k and -0.8% at 4k, where 'none+pdl' gave +4.2% and +3.8%).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        m0 = nmask[:, None] & (offs_k < K)[None, :]
        w0 = tl.load(w_ptrs, mask=m0, other=0.0)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()   # after the wait: at most one grid waits behind this one (no cascade)
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
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, num_stages: int = 4, *, pdl: bool = False,
         peel: bool | None = None) -> torch.Tensor:
    """x (1, K) or (K,), w (N, K) -> (1, N) (or (N,)) in x's dtype (or out's: fp32 out = unrounded dot).
    pdl=True (sm90+): launched as a programmatic dependent launch; the first W tile is loaded before waiting
    on the previous grid. peel: that first-tile structure without PDL (default: = pdl; tests use it on the CPU)."""
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1)
    if x2.shape[1] != w.shape[1] or w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (row-major (N, K)) do not match")
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    N, K = w.shape
    y = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    if y.numel() != N or not y.is_contiguous():
        raise ValueError(f"gemv: out must be contiguous with {N} values, got {tuple(y.shape)}")
    if pdl and not pdl_supported(x.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    _gemv_kernel[(triton.cdiv(N, block_n),)](x2, w, y, N, K, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             EVEN_K=K % block_k == 0, PEEL=pdl if peel is None else peel,
                                             USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, **extra)
    return y.view(N) if squeeze else y
