"""2D vision RoPE applied in place to q and k (the "separate kernel" alternative to fusing the rotation
into kernels/vision_attention.py; the benchmark measures both).

    (x_e, x_o)[n, h, i] <- (x_e cos a - x_o sin a,  x_e sin a + x_o cos a),   a = angle[n, i]
    angle[n, i] = row[n] * freq[2i] (i < D/4),  col[n] * freq[2(i - D/4) + 1] (i >= D/4)   (fp32)

Shapes: x (N, H, D) fp16/bf16/fp32 with last dim contiguous (a view into a qkv buffer is fine), positions
(N, 2) int32, freqs (next_pow2(D/2),) fp32 from vision_attention.rope_pair_freqs. layout "interleaved"
(pairs (2i, 2i+1), Mistral) or "half" (pairs (i, D/2+i)). cos/sin are computed once per (token, pair)
and reused for every head. In-place is safe: each element is read and written by the same program and
each output depends only on its own pair.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_2d_kernel(X, POS, FREQ, N, H, stride_xn, stride_xh, stride_pn,
                    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QUARTER: tl.constexpr,
                    PAIR_STRIDE: tl.constexpr, ODD_OFF: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, HALF)
    rmask = rows < N
    m = rmask[:, None] & (offs_i < HEAD_DIM // 2)[None, :]
    r = tl.load(POS + rows * stride_pn, mask=rmask, other=0)
    c = tl.load(POS + rows * stride_pn + 1, mask=rmask, other=0)
    freq = tl.load(FREQ + offs_i)
    p = tl.where(offs_i[None, :] < QUARTER, r[:, None], c[:, None]).to(tl.float32)
    ang = p * freq[None, :]
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    base = X + rows[:, None] * stride_xn + (offs_i * PAIR_STRIDE)[None, :]
    for h in range(H):
        ptr = base + h * stride_xh
        xe = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        xo = tl.load(ptr + ODD_OFF, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr, (xe * cs - xo * sn).to(X.dtype.element_ty), mask=m)
        tl.store(ptr + ODD_OFF, (xe * sn + xo * cs).to(X.dtype.element_ty), mask=m)


def rope_2d_(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, layout: str = "interleaved",
             block_t: int = 32) -> torch.Tensor:
    """Rotate x (N, H, D) in place (see module docstring); returns x."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x: expected (N, H, D) with contiguous last dim, got {tuple(x.shape)} {x.stride()}")
    N, H, D = x.shape
    if positions.shape != (N, 2) or positions.dtype != torch.int32 or positions.stride(1) != 1:
        raise ValueError(f"positions: expected ({N}, 2) int32, got {tuple(positions.shape)} {positions.dtype}")
    if freqs.dtype != torch.float32 or freqs.numel() != triton.next_power_of_2(D // 2):
        raise ValueError("freqs: expected vision_attention.rope_pair_freqs(head_dim, theta)")
    if layout not in ("interleaved", "half"):
        raise ValueError(f"layout: 'interleaved' or 'half', got {layout!r}")
    if N == 0:
        return x
    grid = (triton.cdiv(N, block_t),)
    _rope_2d_kernel[grid](x, positions, freqs, N, H, x.stride(0), x.stride(1), positions.stride(0),
                          HEAD_DIM=D, HALF=triton.next_power_of_2(D // 2), QUARTER=D // 4,
                          PAIR_STRIDE=2 if layout == "interleaved" else 1,
                          ODD_OFF=1 if layout == "interleaved" else D // 2, BLOCK_T=block_t, num_warps=4)
    return x


__all__ = ["rope_2d_"]
