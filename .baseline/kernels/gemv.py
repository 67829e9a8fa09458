"""Batch-1 GEMV for decode: y (1, N) = x (1, K) @ W.T, W (N, K) row-major (nn.Linear layout), bf16 in,
fp32 accumulate. Candidate replacement for cuBLAS at M=1, kept only if it reads weights faster
(benchmarks/bench_decode_step.py measures both on every decoder shape).

Grid: cdiv(N, BLOCK_N) programs; each streams its BLOCK_N rows of W in (BLOCK_N, BLOCK_K) tiles along K
(16-byte vector loads, coalesced), keeps a (BLOCK_N, BLOCK_K) fp32 partial and reduces it once at the end.

gemv_fused: the same GEMV with the decode step's neighbours folded in (one launch instead of two or three):
    prologue  norm_weight=g:  x <- x * rsqrt(mean(x^2) + eps) * g   (RMSNorm of the K-row; every program
                              streams the whole row anyway, so sum(x^2) is accumulated in the K loop and
                              rstd applied to the dot product at the end: y = rstd * sum_k w[n,k] x[k] g[k])
              silu=True:      x (1, 2K) is the w13 output -> x <- silu(x[:K]) * x[K:] (rounded to x's dtype,
                              like silu_mul), computed on the fly from L2
    epilogue  residual=r:     y <- y + r  (y rounded to the output dtype first, then the add rounded: the
                              same two roundings as `y = x @ W.T; r + y` in the model dtype)
    pdl=True (sm90+):         launched as a programmatic dependent launch: the kernel lets the next one
                              launch at once, loads its first weight tile (constant), then waits on the
                              previous grid (griddepcontrol.wait) before touching x or writing y. Every
                              kernel of a PDL chain waits before its first dependent access, so ordering
                              stays transitive.
Measured (H200, benchmarks/results/decode_step.jsonl, 2026-11-22): the fused prologues cost more than they
save (per K tile every thread re-loads the norm weight / recomputes silu for its columns): wqkv+norm 0.88x,
w2+silu 0.81x the plain GEMV; the decode step lost 6% ('fused') and 7% ('pdl'), so the decoder keeps them off.
gemv(pdl=True) (plain GEMV as a programmatic dependent launch, first W tile loaded before griddepcontrol.wait,
dependents triggered after it) on the 'none' chain: +4.2% tok/s at 1k, +3.8% at 4k (H200, same run); gemv(glu=True)
(w13 with the SiLU-mul epilogue) 3.75 vs 3.63 TB/s for w13 GEMV + silu_mul.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # grid dependency control (PDL); absent in old Triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, GLU: tl.constexpr = False, PEEL: tl.constexpr = False,
                 USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    # GLU: the up rows (w3) sit N rows below the gate rows
    u_ptrs = w_ptr + (offs_n + N)[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_start = 0
    if PEEL:
        # first K tile of W (constant data) loaded before waiting on the producer of x (PDL)
        m0 = nmask[:, None] & (offs_k < K)[None, :]
        w0 = tl.load(w_ptrs, mask=m0, other=0.0)
        if GLU:
            u0 = tl.load(u_ptrs, mask=m0, other=0.0)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()   # after the wait: at most one grid waits behind this one (no cascade)
        x0 = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        acc += w0.to(tl.float32) * x0[None, :]
        if GLU:
            acc_u += u0.to(tl.float32) * x0[None, :]
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + offs_k)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
            if GLU:
                u = tl.load(u_ptrs + k0, mask=nmask[:, None], other=0.0)
        else:
            kmask = k0 + offs_k < K
            x = tl.load(x_ptr + k0 + offs_k, mask=kmask, other=0.0)
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
            if GLU:
                u = tl.load(u_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if GLU:
            acc_u += u.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if GLU:  # silu(gate) * up with the roundings of w13 GEMV -> silu_mul in x's dtype
        g = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        up = tl.sum(acc_u, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g)) * up).to(x_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, num_stages: int = 4, *, glu: bool = False, pdl: bool = False,
         peel: bool | None = None) -> torch.Tensor:
    """x (1, K) or (K,), w (N, K) -> (1, N) (or (N,)) in x's dtype (or out's: fp32 out = unrounded dot).
    glu=True: w is the fused w13 (2H, K) -> (1, H) = silu(x @ w[:H].T) * (x @ w[H:].T) (each dot rounded to
    x's dtype first, product rounded once: the same values as gemv -> silu_mul). pdl=True (sm90+): launched as
    a programmatic dependent launch; the first W tile is loaded before waiting on the previous grid.
    peel: that first-tile structure without PDL (default: = pdl; tests use it on the CPU)."""
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1)
    if x2.shape[1] != w.shape[1] or w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (row-major (N, K)) do not match")
    if glu and w.shape[0] % 2:
        raise ValueError(f"gemv: glu=True needs w with an even row count (gate | up), got {tuple(w.shape)}")
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    N, K = w.shape
    if glu:
        N //= 2
    y = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    if y.numel() != N or not y.is_contiguous():
        raise ValueError(f"gemv: out must be contiguous with {N} values, got {tuple(y.shape)}")
    if pdl and not pdl_supported(x.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    _gemv_kernel[(triton.cdiv(N, block_n),)](x2, w, y, N, K, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             EVEN_K=K % block_k == 0, GLU=glu, PEEL=pdl if peel is None else peel,
                                             USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, **extra)
    return y.view(N) if squeeze else y


@triton.jit
def _x_tile(x_ptr, g_ptr, k0, offs_k, K, NORM: tl.constexpr, SILU: tl.constexpr):
    """fp32 input chunk x[k0:k0+BLOCK_K] after the prologue (norm weight applied, rstd not) and its x^2."""
    k = k0 + offs_k
    km = k < K
    if SILU:
        g = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + k, mask=km, other=0.0).to(tl.float32)
        xv = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        xv = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
    sq = xv * xv
    if NORM:
        xv = xv * tl.load(g_ptr + k, mask=km, other=0.0).to(tl.float32)
    return xv, sq


@triton.jit
def _gemv_fused_kernel(x_ptr, g_ptr, w_ptr, r_ptr, y_ptr, N, K, stride_w, eps,
                       NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    # first weight tile: constant data, loaded before waiting on the producer of x (PDL)
    if EVEN_K:
        w0 = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
    else:
        w0 = tl.load(w_ptrs, mask=nmask[:, None] & (offs_k < K)[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()
    xv, sq = _x_tile(x_ptr, g_ptr, 0, offs_k, K, NORM, SILU)
    acc = w0.to(tl.float32) * xv[None, :]
    ss = sq
    for k0 in range(BLOCK_K, K, BLOCK_K):
        xv, sq = _x_tile(x_ptr, g_ptr, k0, offs_k, K, NORM, SILU)
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
        ss += sq
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * (1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps))
    y = y.to(y_ptr.dtype.element_ty)
    if RESIDUAL:
        r = tl.load(r_ptr + offs_n, mask=nmask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_n, y, mask=nmask)


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: CUDA sm90+ and a Triton with griddepcontrol."""
    device = torch.device(device)
    return (gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def gemv_fused(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
               silu: bool = False, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, pdl: bool = False, block_n: int = 8, block_k: int = 512,
               num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """y (1, N) = prologue(x) @ W.T [+ residual]. W (N, K) row-major.
    x: (1, K) (or (1, 2K) with silu=True: the w13 output [gate | up]); norm_weight (K,): RMSNorm of x first;
    residual (1, N): added after rounding. Output dtype: out's, else out_dtype, else x's."""
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"gemv_fused: w must be row-major (N, K), got {tuple(w.shape)} strides {w.stride()}")
    N, K = w.shape
    kx = 2 * K if silu else K
    if x.numel() != kx or x.dim() not in (1, 2):
        raise ValueError(f"gemv_fused: x {tuple(x.shape)} must hold {kx} values (w {tuple(w.shape)}, silu={silu})")
    x2 = x.reshape(1, kx)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if norm_weight is not None and (norm_weight.shape != (K,) or not norm_weight.is_contiguous()):
        raise ValueError(f"gemv_fused: norm_weight must be contiguous ({K},), got {tuple(norm_weight.shape)}")
    if residual is not None and (residual.numel() != N or not residual.is_contiguous()):
        raise ValueError(f"gemv_fused: residual must be contiguous with {N} values, got {tuple(residual.shape)}")
    y = torch.empty(1, N, dtype=out_dtype or x.dtype, device=x.device) if out is None else out
    if y.numel() != N or not y.is_contiguous():
        raise ValueError(f"gemv_fused: out must be contiguous with {N} values, got {tuple(y.shape)}")
    if pdl and not pdl_supported(x.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    _gemv_fused_kernel[(triton.cdiv(N, block_n),)](
        x2, x2 if norm_weight is None else norm_weight, w, y if residual is None else residual, y, N, K,
        w.stride(0), eps, NORM=norm_weight is not None, SILU=silu, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, USE_PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **extra)
    return y
