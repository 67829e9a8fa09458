"""FP8 x FP8 GEMM with per-row and per-column scales (FP8 tensor cores): prefill, and decode's 1..64 rows.

    y[m, n] = round( (sum_k x8[m, k] * W8[n, k]) * s_x[m] * s_w[n] )

x8 (M, K) float8_e4m3fn row-major, s_x (M, 1) fp32 (kernels/fp8_quant.py: per-token dynamic); W8 (N, K)
float8_e4m3fn row-major (nn.Linear layout), s_w (N,) fp32 (per output channel); y (M, N) bf16 (or out's
dtype). fp32 accumulation; both scales applied once in the epilogue. FLOPs: 2 M N K.

Three implementations, same formula:
  backend "scaled_mm"  torch._scaled_mm with row-wise scales (cuBLASLt on sm89+; needs K, N % 16 == 0)
  backend "triton"     _fp8_gemm_kernel below: (BLOCK_M, BLOCK_N) output tiles, grouped launch order for L2
                       reuse of W, tl.dot on fp8 operands (wgmma on sm90), each K tile's partial sum added
                       to an fp32 accumulator. Runs in the interpreter (CI).
  backend "skinny"     decode, M <= 64 rows (W8A8: the activations quantised per token as in prefill):
                       _fp8_skinny_kernel, swapped operands: each program computes y^T for BLOCK_N weight rows
                       x all M rows (padded to BLOCK_M >= 16), acc (BLOCK_N, BLOCK_M) += W8 tile (BLOCK_N,
                       BLOCK_K) @ x8^T tile (BLOCK_K, BLOCK_M) on the FP8 tensor cores. W is read once per
                       step and never converted (the fp8 -> fp32 conversions of a CUDA-core GEMV bound
                       kernels/fp8_gemv.py below the copy bandwidth), so the kernel streams W at HBM speed.
                       pdl=True (sm90+): the first W tile is loaded before the wait on the producer of x8
                       (programmatic dependent launch, the decode chain's protocol: kernels/pdl.py).
                       split_k=S: K split over S programs per N tile (more programs for the N = 5120 shapes,
                       160 tiles of 32 rows on 132 SMs); partials in an fp32 workspace, the last split to
                       arrive sums them in split order (deterministic) and writes y.
benchmarks/bench_fp8_linear.py measures them on the decoder's shapes; pixtral_rt/decoder.py uses the winners.
No autotuning: fixed tiles, so nothing is tuned on the request path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.fp8 import FP8_DTYPE
from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported


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


@triton.jit
def _fp8_skinny_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn,
                       stride_ym, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr = 1, USE_PDL: tl.constexpr = False):
    # one program: BLOCK_N rows of W against every row of x (BLOCK_M >= M), over the K range of its split
    # (program_id 1; K_SPLIT columns, a multiple of BLOCK_K); the output tile is y^T
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mmask, nmask = offs_m < M, offs_n < N
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + k_lo + offs_k[None, :]      # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + k_lo + offs_k[:, None]      # (BLOCK_K, BLOCK_M) = x8^T
    # first K tile of W (constant data) before waiting on the producer of x8; the loop after it is a plain
    # load-load-dot loop that Triton software-pipelines (num_stages)
    kmask0 = k_lo + offs_k < k_hi
    w0 = tl.load(w_ptrs, mask=nmask[:, None] & kmask0[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()      # after the wait: at most one grid waits behind this one
    x0 = tl.load(x_ptrs, mask=mmask[None, :] & kmask0[:, None], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc += tl.dot(w0, x0)            # each K tile's sum promoted into fp32 (see _fp8_gemm_kernel)
    for k0 in range(BLOCK_K, k_hi - k_lo, BLOCK_K):
        if EVEN_K:                   # K and K_SPLIT multiples of BLOCK_K: no partial tile
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
            x = tl.load(x_ptrs + k0, mask=mmask[None, :], other=0.0)
        else:
            kmask = k_lo + k0 + offs_k < k_hi
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=mmask[None, :] & kmask[:, None], other=0.0)
        acc += tl.dot(w, x)
    sx = tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
    y = acc * sw[:, None] * sx[None, :]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        # split K: each split's partial tile to the workspace (SPLIT_K, BLOCK_M, N) fp32; the split that arrives
        # last (a counter per N tile) sums the partials in split order (deterministic) and writes y, then resets
        # the counter for the next call
        ws_tile = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(ws_ptr + pid_k * BLOCK_M * N + ws_tile, y, mask=omask)
        tl.debug_barrier()           # every thread's partial stored before the arrival is counted
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in range(SPLIT_K):
                tot += tl.load(ws_ptr + s * BLOCK_M * N + ws_tile, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid, 0)


TRITON_TILES = dict(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=4)
# decode (backend "skinny"): BLOCK_M is the row count padded to 16 / 32 / 64; per-shape tiles come from
# pixtral_rt/decoder.py (FP8_DECODE_CONFIGS, swept by benchmarks/bench_fp8_linear.py)
SKINNY_TILES = dict(block_n=64, block_k=256, num_warps=4, num_stages=4)
SKINNY_MAX_M = 64


def skinny_block_m(M: int) -> int:
    """The padded row tile of backend "skinny" for M rows: 16, 32 or 64 (the key of per-shape tile tables)."""
    return min(SKINNY_MAX_M, max(16, triton.next_power_of_2(M)))
BACKENDS = ("scaled_mm", "triton", "skinny")


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
             backend: str = "scaled_mm", out: torch.Tensor | None = None, pdl: bool = False,
             **tiles) -> torch.Tensor:
    """(M, K) fp8, (M, 1) fp32, (N, K) fp8, (N,) fp32 -> (M, N) out_dtype: (x8 @ w8.T) * sx * sw.
    pdl (backend "skinny", sm90+): a programmatic dependent launch (the decode chain)."""
    _check(x8, sx, w8, sw)
    M, K = x8.shape
    N = w8.shape[0]
    if backend == "skinny":
        return _skinny(x8, sx, w8, sw, out_dtype, out, pdl, tiles)
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


def _skinny(x8, sx, w8, sw, out_dtype, out, pdl, tiles) -> torch.Tensor:
    M, K = x8.shape
    N = w8.shape[0]
    if M > SKINNY_MAX_M:
        raise ValueError(f"fp8_gemm: backend 'skinny' takes at most {SKINNY_MAX_M} rows, got {M}")
    y = torch.empty(M, N, dtype=out_dtype, device=x8.device) if out is None else out
    if y.shape != (M, N) or y.stride(1) != 1:
        raise ValueError(f"fp8_gemm: out must be ({M}, {N}) with a unit last stride, got {tuple(y.shape)}")
    t = dict(SKINNY_TILES, **tiles)
    bm = t.get("block_m") or skinny_block_m(M)
    if bm < M:
        raise ValueError(f"fp8_gemm: block_m {bm} < {M} rows (backend 'skinny' covers every row in one tile)")
    bn, bk, split = t["block_n"], t["block_k"], int(t.get("split_k", 1))
    n_tiles = triton.cdiv(N, bn)
    k_split = triton.cdiv(triton.cdiv(K, bk), split) * bk         # each split's K columns, whole BLOCK_K tiles
    split = triton.cdiv(K, k_split)                                # no empty split
    if split > 1:
        ws = torch.empty(split, bm, N, dtype=torch.float32, device=x8.device)
        cnt = _counters(x8.device, n_tiles)
    else:
        ws = cnt = y                                               # unused
    extra = dict(USE_PDL=True, launch_pdl=True) if pdl and pdl_supported(x8.device) else {}
    if M:
        _fp8_skinny_kernel[(n_tiles, split)](x8, w8, sx, sw, y, ws, cnt, M, N, K, k_split, x8.stride(0), w8.stride(0),
                                             y.stride(0), BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, EVEN_K=K % bk == 0,
                                             SPLIT_K=split, num_warps=t["num_warps"], num_stages=t["num_stages"],
                                             **extra)
    return y


_COUNTERS: dict = {}


def _counters(device, n: int) -> torch.Tensor:
    """Arrival counters of split-K tiles: zero between calls (the last split of each tile resets its own), one
    buffer per device, grown as needed (allocated outside any graph capture by the first, eager, call)."""
    key = torch.device(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf
