"""2D vision RoPE applied in place to a stack of heads (q and k of a fused qkv buffer in ONE launch).

    (x_e, x_o)[n, h, i] <- (x_e cos a - x_o sin a,  x_e sin a + x_o cos a),   a = angle[n, i]
    angle[n, i] = row[n] * freq[2i] (i < D/4),  col[n] * freq[2(i - D/4) + 1] (i >= D/4)   (fp32)

Shapes: x (N, NH, D) fp16/bf16/fp32 with last dim contiguous and any row / head strides: for a fused
qkv buffer (N, 3, H, D) pass `qkv.view(N, 3 * H, D)[:, :2 * H]` and q and k turn together. positions
(N, 2) int32, freqs (next_pow2(D/2),) fp32 from vision_attention.rope_pair_freqs. layout "interleaved"
(pairs (2i, 2i+1), Mistral) or "half" (pairs (i, D/2+i)).

Parallelisation: grid (cdiv(N, BLOCK_T), cdiv(NH, BLOCK_H)), one (BLOCK_T tokens x BLOCK_H heads x D) tile
per program (~4k elements), loaded with contiguous 16-byte vectors along D; the interleaved pairs are
split in registers (reshape (.., D/2, 2) + split), not by strided loads. cos/sin are computed once per
(token, pair) in each program and broadcast over its BLOCK_H heads (all 2H heads of q and k for
Pixtral: one sin/cos per token and pair per launch, i.e. a per-token table that never touches memory).
Traffic: read + write of x once (2 * N * NH * D * elem bytes). In place is safe: every element is read
and written by one program and each output depends only on its own pair.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_2d_kernel(X, POS, FREQ, N, NH, stride_xn, stride_xh, stride_pn,
                    HEAD_DIM: tl.constexpr, DP: tl.constexpr, HALF: tl.constexpr, QUARTER: tl.constexpr,
                    INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < N
    hmask = heads < NH
    offs_i = tl.arange(0, HALF)
    r = tl.load(POS + rows * stride_pn, mask=rmask, other=0)
    c = tl.load(POS + rows * stride_pn + 1, mask=rmask, other=0)
    freq = tl.load(FREQ + offs_i)
    p = tl.where(offs_i[None, :] < QUARTER, r[:, None], c[:, None]).to(tl.float32)
    ang = p * freq[None, :]                                   # (BLOCK_T, HALF) fp32
    cs = tl.cos(ang)[:, None, :]
    sn = tl.sin(ang)[:, None, :]
    base = X + rows.to(tl.int64)[:, None, None] * stride_xn + (heads * stride_xh)[None, :, None]
    th = rmask[:, None, None] & hmask[None, :, None]
    if INTERLEAVED:
        offs_d = tl.arange(0, DP)
        ptr = base + offs_d[None, None, :]
        if DP == HEAD_DIM:
            m = th
        else:
            m = th & (offs_d < HEAD_DIM)[None, None, :]
        x = tl.load(ptr, mask=m, other=0.0)
        xe, xo = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_H, HALF, 2)))
        ye = xe * cs - xo * sn
        yo = xe * sn + xo * cs
        y = tl.reshape(tl.join(ye, yo), (BLOCK_T, BLOCK_H, DP))
        tl.store(ptr, y.to(X.dtype.element_ty), mask=m)
    else:
        ptr = base + offs_i[None, None, :]
        m = th & (offs_i < HEAD_DIM // 2)[None, None, :]
        xe = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        xo = tl.load(ptr + HEAD_DIM // 2, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr, (xe * cs - xo * sn).to(X.dtype.element_ty), mask=m)
        tl.store(ptr + HEAD_DIM // 2, (xe * sn + xo * cs).to(X.dtype.element_ty), mask=m)


def rope_2d_blocks(n_heads: int, head_dim: int, tile_elems: int = 4096) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H): all heads of a token in one program when they fit ~tile_elems elements."""
    dp = triton.next_power_of_2(head_dim)
    bh = min(triton.next_power_of_2(max(n_heads, 1)), max(1, tile_elems // dp))
    bt = max(1, tile_elems // (bh * dp))
    return bt, bh


def rope_2d_(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, layout: str = "interleaved",
             tile_elems: int = 4096, num_warps: int = 4) -> torch.Tensor:
    """Rotate x (N, NH, D) in place (see module docstring); returns x."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x: expected (N, H, D) with contiguous last dim, got {tuple(x.shape)} {x.stride()}")
    N, NH, D = x.shape
    if D % 2:
        raise ValueError(f"x: head_dim {D} must be even")
    if positions.shape != (N, 2) or positions.dtype != torch.int32 or positions.stride(1) != 1:
        raise ValueError(f"positions: expected ({N}, 2) int32, got {tuple(positions.shape)} {positions.dtype}")
    if freqs.dtype != torch.float32 or freqs.numel() != triton.next_power_of_2(D // 2):
        raise ValueError("freqs: expected vision_attention.rope_pair_freqs(head_dim, theta)")
    if layout not in ("interleaved", "half"):
        raise ValueError(f"layout: 'interleaved' or 'half', got {layout!r}")
    if N == 0 or NH == 0:
        return x
    bt, bh = rope_2d_blocks(NH, D, tile_elems)
    grid = (triton.cdiv(N, bt), triton.cdiv(NH, bh))
    _rope_2d_kernel[grid](x, positions, freqs, N, NH, x.stride(0), x.stride(1), positions.stride(0),
                          HEAD_DIM=D, DP=triton.next_power_of_2(D), HALF=triton.next_power_of_2(D // 2),
                          QUARTER=D // 4, INTERLEAVED=layout == "interleaved", BLOCK_T=bt, BLOCK_H=bh,
                          num_warps=num_warps)
    return x


def rope_2d_qk_(qkv: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, n_heads: int,
                layout: str = "interleaved") -> torch.Tensor:
    """qkv (N, 3, H, D) or (N, 3*H*D), rows contiguous: rotate q and k in place in one launch; returns qkv."""
    N = qkv.shape[0]
    if N == 0:
        return qkv
    if qkv.stride(-1) != 1 or qkv[0].numel() % (3 * n_heads):
        raise ValueError(f"qkv: expected (N, 3, {n_heads}, D) with contiguous rows, got {tuple(qkv.shape)}")
    D = qkv[0].numel() // (3 * n_heads)
    flat = qkv.reshape(N, 3 * n_heads * D)
    if flat.data_ptr() != qkv.data_ptr() or flat.stride(1) != 1:
        raise ValueError("qkv: rows must be contiguous (a view, not a copy, is rotated)")
    rope_2d_(flat.view(N, 3 * n_heads, D)[:, : 2 * n_heads], positions, freqs, layout)
    return qkv


__all__ = ["rope_2d_", "rope_2d_qk_", "rope_2d_blocks"]
