"""Int4-weight GEMM (W4A16) on tensor cores: skinny decode batches (2..64 rows) and prefill.

    y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k // G]                 (pixtral_rt/int4.py)

x (M, K) bf16 / fp16 / fp32, unit last stride; w an Int4Weight: qweight (N, K / 8) int32 in the KERNEL layout
(pixtral_rt/int4.py), scale (N, K / G) fp32 or bf16; y (M, N) in x's dtype (or out's). FLOPs 2 M N K; bytes
N K / 2 + scales + 2 M K + 2 M N.

backend "triton": _int4_gemm_kernel below, the weight dequantised per tile in registers, swap-AB (the
  weight is the MMA's first operand, so a decode batch of 2..64 rows is the MMA's N dimension, padded to
  BLOCK_M >= 16, not 64 wasted rows):
      program (n-tile, m-tile), acc (BLOCK_N, BLOCK_M) fp32; per block of 8P inputs it loads the
      (BLOCK_N, P) words once, then for each nibble i (unrolled):
          q_i (BLOCK_N, P) = nibble i, converted to x's dtype (exact: integers -8..7)
          acc += tl.dot(q_i, x[m, k0 + i P : k0 + (i + 1) P]^T) * s[n, (k0 + i P) // G]
      i.e. each plane's partial sum (fp32) is scaled by its one scale per row and added: the same math as
      the fp32 reference up to summation order, in any activation dtype (no bf16 rounding of q * s).
  Grouped launch order (GROUP_M m-tiles sweep the same weight tiles while they sit in L2) for prefill.
backend "dequant": kernels/int4_dequant.py writes W = q * s as an (N, K) tensor in x's dtype, then cuBLAS
  (F.linear). For long prefills, where the GEMM is compute-bound and the extra N K write + read is small.
benchmarks/bench_int4.py times both (and the GEMV) on the decoder's shapes; pixtral_rt/decoder.py picks.
No autotuning: fixed tiles, so nothing is tuned on the request path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pixtral_rt.int4 import Int4Weight, check_kernel_weight
from pixtral_rt.kernels.int4_dequant import int4_dequantize
from pixtral_rt.kernels.int4_gemv import _nibble_f32, _use_asm

# bf16 planes in inline PTX (CUDA, bf16 activations): nibbles i and i + 4 of a word sit at bits 4i and 4i + 16, so
# after a shift by 4i one lop3 puts both into the low mantissa bits of two bf16 halves whose exponent is that of
# 128 ((w & 0x000F000F) | 0x43004300 = the bf16 pair 128 + u), and one bf16x2 fma (x 1 - 136) leaves q = u - 8,
# exact: a shift, a lop3 and an fma for 2 weights (the fp32 path: ~4.5 instructions a weight). Two planes a call,
# not eight: all eight at once hold 8 tiles in registers and spill.
_PAIR_ASM = tl.constexpr("""{
.reg .b32 t, w, one, off;
mov.b32 one, 0x3F803F80;
mov.b32 off, 0xC308C308;
shr.u32 w, $2, $3;
lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 t, t, one, off;
mov.b32 {$0, $1}, t;
}""")


@triton.jit
def _plane_pair_bf16(words, I: tl.constexpr):
    """Planes I and I + 4 (I < 4) of (BLOCK_N, P) int32 words as bf16 q = u - 8 (exact), by _PAIR_ASM."""
    shift = tl.full(words.shape, 4 * I, tl.int32)
    lo, hi = tl.inline_asm_elementwise(_PAIR_ASM, "=h,=h,r,r", [words, shift], dtype=(tl.int16, tl.int16),
                                       is_pure=True, pack=1)
    return lo.to(tl.bfloat16, bitcast=True), hi.to(tl.bfloat16, bitcast=True)


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_w, stride_s, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PLANE: tl.constexpr, GROUP: tl.constexpr,
                      GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr = False,
                      BLOCK_P: tl.constexpr = 0):
    # grouped order: GROUP_M m-tiles sweep the same W n-tiles while they sit in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # BLOCK_P (0: the plane width P) word columns a step: a block of 8 P inputs is walked in P / BLOCK_P steps, so
    # the words, the planes and the x tiles of a step are BLOCK_P wide (registers / shared memory for 64 rows)
    PW: tl.constexpr = PLANE if BLOCK_P == 0 else BLOCK_P
    offs_j = tl.arange(0, PW)
    mmask, nmask = offs_m < M, offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_j[None, :]       # (BLOCK_N, PW) words
    xt_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_j[:, None]     # (PW, BLOCK_M) = x^T
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_s                                   # (BLOCK_N,)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for step in range(0, (K // (8 * PLANE)) * (PLANE // PW)):
        b = step // (PLANE // PW)
        c0 = (step % (PLANE // PW)) * PW                 # first word column of this step within the block
        words = tl.load(w_ptrs + b * PLANE + c0, mask=nmask[:, None], other=0)
        k0 = b * 8 * PLANE
        if ASM:      # planes in pairs (i, i + 4), both from one lop3 a word
            for i in tl.static_range(4):
                q_lo, q_hi = _plane_pair_bf16(words, i)                                # (BLOCK_N, PW) bf16, exact
                xt = tl.load(xt_ptrs + k0 + i * PLANE + c0, mask=mmask[None, :], other=0.0)
                s = tl.load(s_rows + (k0 + i * PLANE) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                acc += tl.dot(q_lo, xt, input_precision=PRECISION) * s[:, None]
                xt = tl.load(xt_ptrs + k0 + (i + 4) * PLANE + c0, mask=mmask[None, :], other=0.0)
                s = tl.load(s_rows + (k0 + (i + 4) * PLANE) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                acc += tl.dot(q_hi, xt, input_precision=PRECISION) * s[:, None]
        else:
            for i in tl.static_range(8):
                xt = tl.load(xt_ptrs + k0 + i * PLANE + c0, mask=mmask[None, :], other=0.0)   # (PW, BLOCK_M)
                q = _nibble_f32(words, i).to(xt.dtype)                                    # (BLOCK_N, PW), exact
                s = tl.load(s_rows + (k0 + i * PLANE) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                acc += tl.dot(q, xt, input_precision=PRECISION) * s[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]       # (BLOCK_N, BLOCK_M) = y^T
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


# tiles: not measured yet (benchmarks/bench_int4.py prints the sweep; pixtral_rt/decoder.py keeps the winners)
SKINNY_DEFAULT = dict(block_n=64, group_m=1, num_warps=4, num_stages=3)
PREFILL_DEFAULT = dict(block_m=128, block_n=64, group_m=8, num_warps=8, num_stages=3)
PREFILL_ROWS = 64          # more rows than this: the prefill tiles
# Shared memory: each pipelined stage holds one block of 8 P inputs: the (BLOCK_N, P) int32 words and eight
# (P, BLOCK_M) x tiles, so with the decoder's P = 128 a 64 x 64 tile needs 160 KB a stage. Default tiles get as
# many stages as fit this budget (Hopper: 227 KB a block, minus room for the MMA operands); tiles given
# explicitly (the benchmark's sweep) keep their num_stages and may not compile.
SMEM_BUDGET = 180 * 1024


def stage_bytes(block_m: int, block_n: int, plane: int, x_bytes: int) -> int:
    """Shared memory of one pipelined stage of _int4_gemm_kernel (see SMEM_BUDGET); `plane`: the word columns of
    a step (block_p, or the plane width)."""
    return block_n * plane * 4 + 8 * plane * block_m * x_bytes


def fit_stages(num_stages: int, block_m: int, block_n: int, plane: int, x_bytes: int) -> int:
    """num_stages, lowered until the stages fit SMEM_BUDGET (at least 1: no pipelining)."""
    return max(1, min(num_stages, SMEM_BUDGET // stage_bytes(block_m, block_n, plane, x_bytes)))


FP32_PRECISION = "ieee"    # tl.dot input_precision for fp32 activations (exact products, as the reference)
HALF_PRECISION = "tf32"    # for bf16 / fp16 operands the MMA ignores it; Triton's default
BACKENDS = ("triton", "dequant")


def int4_gemm(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None = None, *, backend: str = "triton",
              block_m: int | None = None, block_n: int | None = None, group_m: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None, asm: bool | None = None,
              block_p: int | None = None) -> torch.Tensor:
    """x (M, K), w Int4Weight (N, K) -> (M, N) in x's dtype (or out's). backend "triton" (tiles left None:
    SKINNY_DEFAULT for M <= 64 with block_m = max(16, next power of two of M), else PREFILL_DEFAULT) or
    "dequant" (dequantise W, then F.linear). block_p: word columns a step (a power of two >= 16 dividing the
    plane width; None: the whole plane; 64 keeps 64-row tiles from spilling, benchmarks/kernel_sass.py). asm: the inline-PTX planes (None: for bf16 x on CUDA; False: the
    fp32 nibble path everywhere, the benchmark's same-run baseline)."""
    if x.dim() != 2:
        raise ValueError(f"int4_gemm: x must be (M, K), got {tuple(x.shape)}")
    M, K = x.shape
    check_kernel_weight(w, K, "int4_gemm")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"int4_gemm: x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    N = w.shape[0]
    if backend == "dequant":
        y = F.linear(x, int4_dequantize(w, x.dtype))
        if out is not None:
            out.copy_(y)
            return out
        return y
    if backend != "triton":
        raise ValueError(f"int4_gemm: backend must be one of {BACKENDS}, got {backend!r}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (M, N) or y.stride(1) != 1:
        raise ValueError(f"int4_gemm: out must be ({M}, {N}) with a unit last stride, got {tuple(y.shape)}")
    if M == 0:
        return y
    t = dict(SKINNY_DEFAULT if M <= PREFILL_ROWS else PREFILL_DEFAULT)
    if M <= PREFILL_ROWS:
        t["block_m"] = min(64, max(16, triton.next_power_of_2(M)))
    t.update({k: v for k, v in dict(block_m=block_m, block_n=block_n, group_m=group_m, num_warps=num_warps,
                                    num_stages=num_stages, block_p=block_p).items() if v is not None})
    bp = min(t.get("block_p") or w.plane, w.plane)
    if bp < 16 or w.plane % bp or bp & (bp - 1):
        raise ValueError(f"int4_gemm: block_p must be a power of two >= 16 dividing the plane width {w.plane}, got {bp}")
    bm, bn = t["block_m"], t["block_n"]
    if num_stages is None:
        t["num_stages"] = fit_stages(t["num_stages"], bm, bn, bp, x.element_size())
    prec = FP32_PRECISION if x.dtype == torch.float32 else HALF_PRECISION
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _int4_gemm_kernel[grid](x, w.qweight, w.scale, y, M, N, K, x.stride(0), w.qweight.stride(0), w.scale.stride(0),
                            y.stride(0), BLOCK_M=bm, BLOCK_N=bn, PLANE=w.plane, GROUP=w.group_size,
                            GROUP_M=t["group_m"], PRECISION=prec,
                            ASM=x.dtype == torch.bfloat16 and _use_asm(x) and asm is not False,
                            BLOCK_P=0 if bp == w.plane else bp, num_warps=t["num_warps"],
                            num_stages=t["num_stages"])
    return y
