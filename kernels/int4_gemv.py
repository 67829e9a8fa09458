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
fsub, fmul, ffma (6 simple ops) - close to what the SMs issue while HBM streams 0.5 byte per weight, so the
tensor-core kernel of kernels/int4_gemm.py is timed at M = 1 beside this one (benchmarks/bench_int4.py);
the decoder uses whichever measures faster (INT4_M1_BACKEND in pixtral_rt/decoder.py).

pdl=True (sm90+): programmatic dependent launch as in kernels/gemv.py: the first block of W (constant data)
is loaded before waiting on the producer of x, so the kernel slots into the decode chain.
"""
from __future__ import annotations

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


GEMV_DEFAULT = dict(block_n=16, num_warps=4, num_stages=4)   # not measured yet: benchmarks/bench_int4.py


def int4_gemv(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None = None, *, pdl: bool = False,
              peel: bool | None = None, block_n: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None) -> torch.Tensor:
    """x (1, K) or (K,), w Int4Weight (N, K) -> (1, N) (or (N,)) in x's dtype (or out's). pdl / peel as in
    kernels/gemv.py (peel: the first-block structure without PDL; tests use it on the CPU)."""
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
    cfg.update({k: v for k, v in dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages).items()
                if v is not None})
    if pdl and not pdl_supported(x.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    bn = cfg["block_n"]
    _int4_gemv_kernel[(triton.cdiv(N, bn),)](
        x2, w.qweight, w.scale, y, N, K, w.qweight.stride(0), w.scale.stride(0), BLOCK_N=bn, PLANE=w.plane,
        GROUP=w.group_size, PEEL=pdl if peel is None else peel, USE_PDL=pdl, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **extra)
    return y.view(N) if squeeze else y
