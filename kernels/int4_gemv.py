"""Int4-weight GEMV for batch-1 decode (W4A16): activations as they are, weights dequantised in registers.

    y[n] = sum_k x[k] * q[n, k] * s[n, k // G]                 (pixtral_rt/int4.py; fp32 accumulation)

x (K,) or (1, K) bf16 / fp16 / fp32, contiguous; the weight an Int4Weight (pixtral_rt/int4.py): qweight
(N, K / 8) int32 in the KERNEL layout (repacked once at load), scale (N, K / G) fp32 or bf16; y (1, N) (or
(N,)) in x's dtype (or out's). Decode is bound by reading W: half a byte per weight plus 2-4 bytes per G.

Kernel layout (pixtral_rt/int4.py, "Kernel layout"): word b * P + j of a row holds, in nibble i, the input
k = b * 8P + i * P + j (+ 8). One program owns BLOCK_N rows and walks K one block of 8P inputs at a time:
it loads the (BLOCK_N, P) tile of words of that block (each row's P words contiguous: 16-byte vector loads,
coalesced), and for each nibble i = 0..7 (unrolled)
    q_i   = ((words >> 4i) & 15) - 8         exact fp32 via the 2^23 magic number: the bits 0x4B000000 | u
                                              are the float 2^23 + u, minus (2^23 + 8) gives u - 8
    x_i   = x[k0 + i P : k0 + (i + 1) P]     a contiguous slice (P,), broadcast over the rows
    s_i   = s[n, (k0 + i P) // G]            one scale per row: a plane lies inside one group (P divides G)
    acc  += (q_i * x_i) * s_i                 acc (BLOCK_N, P) fp32, reduced over P once at the end
No register shuffles: every tensor keeps the layout of the loaded tile. Cost per weight: shift, and, or,
fsub, fmul, ffma - about 8.6 SASS instructions a weight in the main loop with the decoder's tiles
(benchmarks/kernel_sass.py), which caps the weight stream at ~1.8-2.0 TB/s on an H100 however it is scheduled:
what it measured (1.2-1.6 TB/s).

vec = 4 or 8: _int4_gemv_v_kernel, the same layout and math with fewer instructions a weight (4.6 with one warp
of 4 rows, bench_int4's "gemv_v"; not yet timed on a GPU):
    q_i   nibbles 0..4 taken where they lie (bits 4i..4i+3) and 5..7 from the word shifted right by 12 once:
          the bits (2^(23-p) exponent) | (u << p) are the float 2^(23-p) + u, minus (2^(23-p) + 8) gives q,
          so one lop3 (inline PTX on CUDA: AND and OR in one instruction) and one fsub a nibble, no shift
    t     the products of a thread's VEC neighbouring words of a row summed in registers (ffma chain), then
          acc (BLOCK_N, P / VEC) += t * s_i: the scale once per VEC weights instead of once per weight
    rows  past N read row N - 1 (unmasked loads; the store is masked)
With one warp, x's plane slice lands in the layout the tile needs (more warps convert it through shared
memory), and each thread's x values serve its BLOCK_N rows.

pdl=True (sm90+): programmatic dependent launch as in kernels/gemv.py: the first block of W (constant data)
is loaded before waiting on the producer of x, so the kernel slots into the decode chain.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pixtral_rt.int4 import Int4Weight, check_kernel_weight
from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported

MAGIC_F32 = 0x4B000000      # bits of the float 2^23; | u (u < 2^23) gives 2^23 + u exactly
MAGIC_OFFSET = 8388616.0    # 2^23 + 8: subtracting it leaves u - 8 = q


@triton.jit
def _nibble_f32(words, I: tl.constexpr):
    """Nibble I of each int32 word as the fp32 value q = u - 8 (exact)."""
    u = (words >> (4 * I)) & 0xF
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _gemv_block(acc, words, x_ptr, s_rows, nmask, k0, offs_j, PLANE: tl.constexpr, GROUP: tl.constexpr):
    """acc (BLOCK_N, P) += the 8 planes of one block of the kernel layout, dequantised and scaled."""
    for i in tl.static_range(8):
        q = _nibble_f32(words, i)                                                    # (BLOCK_N, P)
        x = tl.load(x_ptr + k0 + i * PLANE + offs_j).to(tl.float32)                  # (P,)
        s = tl.load(s_rows + (k0 + i * PLANE) // GROUP, mask=nmask, other=0.0).to(tl.float32)   # (BLOCK_N,)
        acc += (q * x[None, :]) * s[:, None]
    return acc


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w, stride_s, BLOCK_N: tl.constexpr,
                      PLANE: tl.constexpr, GROUP: tl.constexpr, PEEL: tl.constexpr = False,
                      USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_j = tl.arange(0, PLANE)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_j[None, :]      # (BLOCK_N, P) words, block 0
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_s                                  # (BLOCK_N,) row starts
    acc = tl.zeros([BLOCK_N, PLANE], tl.float32)
    n_blocks = K // (8 * PLANE)
    b_start = 0
    if PEEL:
        # first block of W (constant data) loaded before waiting on the producer of x (PDL)
        w0 = tl.load(w_ptrs, mask=nmask[:, None], other=0)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()   # after the wait: at most one grid waits behind this one
        acc = _gemv_block(acc, w0, x_ptr, s_rows, nmask, 0, offs_j, PLANE, GROUP)
        b_start = 1
    for b in range(b_start, n_blocks):
        words = tl.load(w_ptrs + b * PLANE, mask=nmask[:, None], other=0)
        acc = _gemv_block(acc, words, x_ptr, s_rows, nmask, b * 8 * PLANE, offs_j, PLANE, GROUP)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _nibble_in_place(src, P: tl.constexpr, ASM: tl.constexpr):
    """The nibble at bits P..P+3 of each int32 word as the fp32 value q = u - 8, exact, without a shift: the
    bits (2^(23-P) exponent) | (u << P) are the float 2^(23-P) + u, minus (2^(23-P) + 8) leaves u - 8.
    ASM (CUDA): the mask and the OR as one lop3 (ptxas emits an AND and an OR for the plain expression; LUT
    0xEA = (a & b) | c); the plain expression elsewhere (the interpreter), the same bits."""
    if ASM:
        mask = tl.full(src.shape, 0xF << P, tl.int32)
        exponent = tl.full(src.shape, (150 - P) << 23, tl.int32)
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [src, mask, exponent],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (src & (0xF << P)) | ((150 - P) << 23)
    return bits.to(tl.float32, bitcast=True) - (2.0 ** (23 - P) + 8.0)


@triton.jit
def _gemv_block_v(acc, words, x_ptr, s_rows, k0, offs_j, BLOCK_N: tl.constexpr, PLANE: tl.constexpr,
                  GROUP: tl.constexpr, VEC: tl.constexpr, ASM: tl.constexpr):
    """acc (BLOCK_N, P / VEC) += one block of the kernel layout; words (BLOCK_N, P). Per weight one LOP3, one
    FADD and one FFMA: nibbles 0..4 are taken in place, 5..7 from the word shifted right by 12 once (to bits
    8..19), so no shift per nibble; the products of VEC neighbouring words (one thread's 16-byte vector) are
    summed before the row's scale is applied, once per plane."""
    hi = words >> 12
    s_blk = s_rows + k0 // GROUP
    for i in tl.static_range(8):
        if i < 5:
            q = _nibble_in_place(words, 4 * i, ASM)
        else:
            q = _nibble_in_place(hi, 4 * i - 12, ASM)
        x = tl.load(x_ptr + k0 + i * PLANE + offs_j).to(tl.float32)                  # (P,)
        # group of plane i: (k0 + i P) // G = k0 // G + i P // G (P, G powers of two, P | G, k0 a multiple of
        # 8 P): the per-plane offset is a constant, folded into the load
        s = tl.load(s_blk + (i * PLANE) // GROUP).to(tl.float32)                          # (BLOCK_N,)
        t = tl.sum(tl.reshape(q * x[None, :], (BLOCK_N, PLANE // VEC, VEC)), axis=2)    # (BLOCK_N, P / VEC)
        acc += t * s[:, None]
    return acc


@triton.jit
def _int4_gemv_v_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w, stride_s, BLOCK_N: tl.constexpr,
                        PLANE: tl.constexpr, GROUP: tl.constexpr, VEC: tl.constexpr, ASM: tl.constexpr,
                        PEEL: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    # rows past N (the last program's) read row N - 1 instead of masked loads: no per-load zero fill, and the
    # store is masked
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_j = tl.arange(0, PLANE)
    w_ptrs = w_ptr + rows[:, None] * stride_w + offs_j[None, :]                     # (BLOCK_N, P) words, block 0
    s_rows = s_ptr + rows * stride_s
    acc = tl.zeros([BLOCK_N, PLANE // VEC], tl.float32)
    n_blocks = K // (8 * PLANE)
    b_start = 0
    if PEEL:
        w0 = tl.load(w_ptrs)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        acc = _gemv_block_v(acc, w0, x_ptr, s_rows, 0, offs_j, BLOCK_N, PLANE, GROUP, VEC, ASM)
        b_start = 1
    for b in range(b_start, n_blocks):
        words = tl.load(w_ptrs + b * PLANE)
        acc = _gemv_block_v(acc, words, x_ptr, s_rows, b * 8 * PLANE, offs_j, BLOCK_N, PLANE, GROUP, VEC, ASM)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def _use_asm(x: torch.Tensor) -> bool:
    """Inline PTX where the kernel is compiled for a CUDA GPU (not under the Triton interpreter)."""
    return x.device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


GEMV_DEFAULT = dict(block_n=16, num_warps=4, num_stages=4, vec=0)   # the tiles of a new shape (not measured)


def int4_gemv(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None = None, *, pdl: bool = False,
              peel: bool | None = None, block_n: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, vec: int | None = None) -> torch.Tensor:
    """x (1, K) or (K,), w Int4Weight (N, K) -> (1, N) (or (N,)) in x's dtype (or out's). pdl / peel as in
    kernels/gemv.py (peel: the first-block structure without PDL; tests use it on the CPU). vec: 0 the 2-D
    plane kernel (_int4_gemv_kernel), 4 or 8 the 3-D one (_int4_gemv_v_kernel) with that many words of a row
    per thread (capped at the plane width)."""
    squeeze = x.dim() == 1
    if x.dim() > 2 or (x.dim() == 2 and x.shape[0] != 1):
        raise ValueError(f"int4_gemv: one row of activations expected, got {tuple(x.shape)}; use int4_gemm")
    x2 = x.reshape(1, -1)
    K = x2.shape[1]
    check_kernel_weight(w, K, "int4_gemv")
    if x2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"int4_gemv: x must be bf16, fp16 or fp32, got {x2.dtype}")
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    N = w.shape[0]
    y = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    if y.numel() != N or not y.is_contiguous():
        raise ValueError(f"int4_gemv: out must be contiguous with {N} values, got {tuple(y.shape)}")
    cfg = dict(GEMV_DEFAULT)
    cfg.update({k: v for k, v in dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, vec=vec).items()
                if v is not None})
    if cfg["vec"] not in (0, 1, 2, 4, 8):
        raise ValueError(f"int4_gemv: vec must be 0 (the plane kernel) or 1, 2, 4, 8 words, got {cfg['vec']}")
    if pdl and not pdl_supported(x.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    bn = cfg["block_n"]
    args = (x2, w.qweight, w.scale, y, N, K, w.qweight.stride(0), w.scale.stride(0))
    common = dict(BLOCK_N=bn, PLANE=w.plane, GROUP=w.group_size, PEEL=pdl if peel is None else peel, USE_PDL=pdl,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    if cfg["vec"]:
        _int4_gemv_v_kernel[(triton.cdiv(N, bn),)](*args, VEC=min(cfg["vec"], w.plane), ASM=_use_asm(x2), **common)
    else:
        _int4_gemv_kernel[(triton.cdiv(N, bn),)](*args, **common)
    return y.view(N) if squeeze else y
