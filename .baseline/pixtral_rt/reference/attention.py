"""Reference attention, written for clarity (fp32 math, explicit softmax). The oracle for kernels/.

block_diagonal_attention: the vision encoder's non-causal attention over several images packed into one
    sequence; a patch attends only to patches of its own image (cu_seqlens marks the image boundaries).
causal_attention: the decoder's causal GQA attention of T new queries over a cache of S >= T keys, the
    queries sitting at the last T positions of the cache.
"""
from __future__ import annotations

import torch


def _softmax_attention(q, k, v, scale, mask=None):
    # q (Tq, H, D), k/v (Tk, H, D) -> (Tq, H, D); fp32
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v.float())


def block_diagonal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | torch.Tensor,
                             scale: float | None = None) -> torch.Tensor:
    """q, k, v (N, H, D); cu_seqlens (n_images + 1,) with cu_seqlens[0] = 0, cu_seqlens[-1] = N.
    Returns (N, H, D) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = [int(b) for b in cu_seqlens]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[a:b] = _softmax_attention(q[a:b], k[a:b], v[a:b], scale)
    return out.to(q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q (T, Hq, D); k, v (S, Hkv, D) with S >= T; query t sits at position S - T + t and sees keys <= it.
    GQA: query head h uses kv head h // (Hq // Hkv). Returns (T, Hq, D) in q's dtype."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    scale = D ** -0.5 if scale is None else scale
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    qpos = torch.arange(S - T, S, device=q.device)[:, None]
    kpos = torch.arange(S, device=q.device)[None, :]
    return _softmax_attention(q, k, v, scale, mask=kpos <= qpos).to(q.dtype)
