"""Rotary position embeddings exactly as Mistral defines them (mistral-inference rope.py).

Angles are computed in fp32 and applied to INTERLEAVED pairs (x[2i], x[2i+1]) as a complex product:
    (x[2i] + j x[2i+1]) * exp(j angle[i])  ->  out[2i]   = x[2i] cos - x[2i+1] sin
                                                out[2i+1] = x[2i] sin + x[2i+1] cos

Text (1D):   angle[n, i] = pos[n] * theta^(-2i/D),                       i < D/2
Vision (2D): freqs = theta^(-2k/D), k < D/2;  angle[n] = cat(row[n] * freqs[0::2], col[n] * freqs[1::2])
             (D/4 row angles, then D/4 column angles)
"""
from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(D/2,) fp32: theta^(-2k/D)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def text_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions (N,) int -> angles (N, D/2) fp32."""
    f = rope_frequencies(head_dim, theta, positions.device)
    return positions.to(torch.float32)[:, None] * f[None, :]


def vision_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions (N, 2) int as (row, col) -> angles (N, D/2) fp32."""
    f = rope_frequencies(head_dim, theta, positions.device)
    rows = positions[:, 0].to(torch.float32)[:, None] * f[None, 0::2]
    cols = positions[:, 1].to(torch.float32)[:, None] * f[None, 1::2]
    return torch.cat([rows, cols], dim=-1)


def image_patch_positions(patch_grids: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(rows, cols) per image -> (sum rows*cols, 2) int64 (row, col), row-major within each image."""
    out = []
    for rows, cols in patch_grids:
        r = torch.arange(rows, device=device).repeat_interleave(cols)
        c = torch.arange(cols, device=device).repeat(rows)
        out.append(torch.stack([r, c], dim=-1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.int64, device=device)
    return torch.cat(out)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (N, H, D) (or (B, N, H, D)), angles (N, D/2) fp32 -> same shape and dtype as x; math in fp32."""
    xf = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    cos = torch.cos(angles)[:, None, :]  # (N, 1, D/2): broadcast over heads
    sin = torch.sin(angles)[:, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape(x.shape).to(x.dtype)
