"""Split-KV decode attention (flash-decoding) for GQA, head_dim 128, over the static KV cache.

    q (B, Hq, D) rotated queries of one new token per sequence (a view of the qkv GEMM output is fine)
    k_cache, v_cache (n_slots, Hkv, max_seq, D): sequence b reads slot b, keys [0, cache_lens[b])
    out (B, Hq, D):  out[b, h] = softmax_j(q[b,h] . k[b,j] * D^-0.5) v[b,j],  j < cache_lens[b]

Two launches:
  1. _decode_split_kernel, grid (num_splits, Hkv, B): program (s, g, b) takes the s-th of num_splits
     equal chunks of [0, cache_lens[b]) (chunk length computed on the device from cache_lens, rounded up
     to BLOCK_N) and serves ALL Hq/Hkv query heads of kv group g from one read of each K/V tile (the
     group's heads are the M dim of tl.dot, padded to 16). Writes an unnormalised partial (acc, max, sum).
  2. _decode_reduce_kernel, grid (B, Hq): log-sum-exp merge of the num_splits partials.
CUDA-graph capturable: cache lengths are read from device memory and the grid depends only on B and
num_splits (chosen on the host from B, Hkv and the SM count, never from the lengths).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.gemv import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale,
                         stride_qb, stride_qh, stride_cb, stride_ch, stride_cs,
                         NUM_SPLITS, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # wait first, then trigger: at most one grid waits behind this one (no launch cascade)
        gdc_wait()
        gdc_launch_dependents()
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    L = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    hmask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None], other=0.0)
    cache_off = b.to(tl.int64) * stride_cb + kvh.to(tl.int64) * stride_ch
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        k = tl.load(k_cache_ptr + cache_off + offs_n[None, :].to(tl.int64) * stride_cs + offs_d[:, None],
                    mask=nmask[None, :], other=0.0)
        v = tl.load(v_cache_ptr + cache_off + offs_n[:, None].to(tl.int64) * stride_cs + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, k) * qk_scale
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    # partials laid out (B, Hq, NUM_SPLITS[, D]); an empty split leaves m = -inf, l = 0, acc = 0
    row = (b * (tl.num_programs(1) * GROUP) + heads).to(tl.int64) * NUM_SPLITS + split
    tl.store(pm_ptr + row, m_i, mask=hmask)
    tl.store(pl_ptr + row, l_i, mask=hmask)
    tl.store(po_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=hmask[:, None])


@triton.jit
def _decode_reduce_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, stride_ob, stride_oh,
                          NUM_SPLITS, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # wait first, then trigger: at most one grid waits behind this one (no launch cascade)
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * tl.num_programs(1) + h).to(tl.int64) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.load(pm_ptr + row + offs_s, mask=smask, other=float("-inf"))
    l = tl.load(pl_ptr + row + offs_s, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.math.exp2(m - m_max), 0.0)
    acc = tl.load(po_ptr + (row + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = tl.where(den > 0, num / den, 0.0)   # cache_lens[b] == 0 (idle batch row): zeros, not NaN
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_partials(workspace: dict | None, B: int, Hq: int, ns: int, D: int, device):
    """The fp32 partials (acc (B, Hq, ns, D), max (B, Hq, ns), sum (B, Hq, ns)) of a split-KV launch, made
    once per shape and kept in the caller's workspace dict (graph replays then reuse the same buffers)."""
    key = (B, Hq, ns, D, device)
    bufs = workspace.get(key) if workspace is not None else None
    if bufs is None:
        bufs = (torch.empty(B, Hq, ns, D, dtype=torch.float32, device=device),
                torch.empty(B, Hq, ns, dtype=torch.float32, device=device),
                torch.empty(B, Hq, ns, dtype=torch.float32, device=device))
        if workspace is not None:
            workspace[key] = bufs
    return bufs


def default_num_splits(batch: int, n_kv_heads: int, device: torch.device, max_splits: int = 64) -> int:
    """Enough (split, kv head, batch) programs for ~4 per SM; 1 on small grids that already fill the GPU."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(max_splits, triton.cdiv(4 * sms, batch * n_kv_heads)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                     num_splits: int | None = None, out: torch.Tensor | None = None,
                     block_n: int = 64, num_warps: int = 4, num_stages: int = 3, pdl: bool = False,
                     workspace: dict | None = None) -> torch.Tensor:
    """q (B, Hq, D), caches (n_slots >= B, Hkv, max_seq, D), cache_lens (B,) int32 device -> out (B, Hq, D).
    pdl: both launches as programmatic dependent launches (sm90+). workspace: a dict the caller keeps (one per
    decoder): the fp32 partial buffers are allocated into it once per (B, Hq, num_splits) and reused."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be (B, Hq, D) with a contiguous last dim, got {tuple(q.shape)} {q.stride()}")
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != D or k_cache.stride(3) != 1 or k_cache.shape[0] < B:
        raise ValueError(f"k_cache must be (slots >= {B}, Hkv, max_seq, {D}) with a contiguous last dim, "
                         f"got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("v_cache must match k_cache's shape and strides")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"q heads {Hq} not a multiple of kv heads {Hkv}")
    if cache_lens.shape != (B,) or cache_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_lens must be ({B},) int32/int64, got {tuple(cache_lens.shape)} {cache_lens.dtype}")
    ns = num_splits or default_num_splits(B, Hkv, q.device)
    group = Hq // Hkv
    po, pm, pl = split_partials(workspace, B, Hq, ns, D, q.device)
    if pdl and not pdl_supported(q.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    o = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device) if out is None else out
    if o.shape != (B, Hq, D) or o.stride(2) != 1:
        raise ValueError(f"out must be ({B}, {Hq}, {D}) with a contiguous last dim")
    qk_scale = D ** -0.5 * 1.4426950408889634
    _decode_split_kernel[(ns, Hkv, B)](
        q, k_cache, v_cache, cache_lens, po, pm, pl, qk_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ns, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_N=block_n, USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, **extra)
    _decode_reduce_kernel[(B, Hq)](po, pm, pl, o, o.stride(0), o.stride(1), ns,
                                   BLOCK_S=triton.next_power_of_2(ns), HEAD_DIM=D, USE_PDL=pdl, num_warps=4, **extra)
    return o
