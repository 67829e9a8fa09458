"""Causal GQA prefill attention (head_dim 128) over a static KV cache, with Mistral's 1D RoPE applied and
the new K/V written into the cache on the way.

Cache layout (one layer): k_cache, v_cache (n_slots, Hkv, max_seq, D), last dim contiguous; token at
position p of slot b lives at [b, :, p, :], already RoPE-rotated (K) -- what decode_attention reads too.

    qkv (T, (Hq + 2 Hkv) * D)   output of the fused wqkv GEMM for T new tokens at positions
                                start_pos .. start_pos + T - 1 of cache slot `slot`
    out (T, Hq, D):  out[t, h] = softmax_j(q_t . k_j * D^-0.5) v_j  over j <= start_pos + t,
                     kv head of q head h = h // (Hq / Hkv); q, k RoPE-rotated (interleaved pairs,
                     angle[p, i] = p * theta^(-2i/D) in fp32, see pixtral_rt/reference/rope.py)

Two launches, one pass over qkv each:
  1. rope_store_kv: per token, rotate q IN PLACE inside qkv, rotate k and write k, v to the cache. The
     cos/sin come from a table of fp32 angles built once (`rope_table`), so they match the reference
     bit for bit. Also used by the decode step (positions/slots read from device memory).
  2. _prefill_attn_kernel: flash attention (online softmax, exp2) over cache positions [0, start_pos+T):
     blocks fully below the diagonal run without masks, the diagonal band with the causal mask.
  Why not one launch: a q block needs the K of every earlier new token, written by other programs of
  the same launch (a grid-wide dependency), or re-rotated per q block (sin/cos in the inner loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.reference.rope import text_rope_angles


def rope_table(max_seq: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(max_seq, D/2, 2) fp32: [cos, sin] of the reference's fp32 angles pos * theta^(-2i/D)."""
    ang = text_rope_angles(torch.arange(max_seq, device=device), head_dim, theta)
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1).contiguous()


# ----------------------------------------------------------------------------- RoPE + cache write
@triton.jit
def _rope_store_kv_kernel(qkv_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, cs_ptr,
                          stride_qkv, stride_cb, stride_ch, stride_cs, stride_tab,
                          HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                          HEAD_DIM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    half = tl.arange(0, HEAD_DIM // 2)
    c = tl.load(cs_ptr + pos * stride_tab + 2 * half)[None, :]      # (1, D/2) fp32
    s = tl.load(cs_ptr + pos * stride_tab + 2 * half + 1)[None, :]
    row = qkv_ptr + t * stride_qkv
    # q heads: rotate in place (even / odd elements of each pair)
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    qm = hq < HQ
    qe_ptr = row + hq * HEAD_DIM + 2 * half[None, :]
    qe = tl.load(qe_ptr, mask=qm, other=0.0).to(tl.float32)
    qo = tl.load(qe_ptr + 1, mask=qm, other=0.0).to(tl.float32)
    tl.store(qe_ptr, (qe * c - qo * s).to(qkv_ptr.dtype.element_ty), mask=qm)
    tl.store(qe_ptr + 1, (qe * s + qo * c).to(qkv_ptr.dtype.element_ty), mask=qm)
    # k heads: rotate, store to the cache
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    km = hk < HKV
    ke_ptr = row + HQ * HEAD_DIM + hk * HEAD_DIM + 2 * half[None, :]
    ke = tl.load(ke_ptr, mask=km, other=0.0).to(tl.float32)
    ko = tl.load(ke_ptr + 1, mask=km, other=0.0).to(tl.float32)
    dst = slot * stride_cb + hk * stride_ch + pos * stride_cs + 2 * half[None, :]
    tl.store(k_cache_ptr + dst, (ke * c - ko * s).to(k_cache_ptr.dtype.element_ty), mask=km)
    tl.store(k_cache_ptr + dst + 1, (ke * s + ko * c).to(k_cache_ptr.dtype.element_ty), mask=km)
    # v heads: copy
    d = tl.arange(0, HEAD_DIM)[None, :]
    v = tl.load(row + (HQ + HKV) * HEAD_DIM + hk * HEAD_DIM + d, mask=km, other=0.0)
    tl.store(v_cache_ptr + slot * stride_cb + hk * stride_ch + pos * stride_cs + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=km)


def _check_cache(k_cache, v_cache, n_kv_heads, head_dim, dtype):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[1] != n_kv_heads or c.shape[3] != head_dim or c.stride(3) != 1:
            raise ValueError(f"{name} must be (slots, {n_kv_heads}, max_seq, {head_dim}) with a contiguous "
                             f"last dim, got {tuple(c.shape)} strides {c.stride()}")
        if c.dtype != dtype:
            raise ValueError(f"{name} dtype {c.dtype} != qkv dtype {dtype}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")


def rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, cos_sin: torch.Tensor, n_heads: int, n_kv_heads: int) -> None:
    """In place: rotate q inside qkv (T, (Hq+2Hkv)*D); write rotated k and v of token t to
    k_cache/v_cache[slots[t], :, positions[t]]. positions, slots: (T,) int32/int64 on the device.
    cos_sin: rope_table(...) (max_seq, D/2, 2) fp32. Capturable (no host sync)."""
    D = k_cache.shape[-1]
    T = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * D or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be (T, {(n_heads + 2 * n_kv_heads) * D}) row-major, got {tuple(qkv.shape)}")
    _check_cache(k_cache, v_cache, n_kv_heads, D, qkv.dtype)
    if positions.shape != (T,) or slots.shape != (T,):
        raise ValueError(f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must be ({T},)")
    if cos_sin.dtype != torch.float32 or cos_sin.shape[1:] != (D // 2, 2) or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin must be a contiguous (max_seq, {D // 2}, 2) fp32 table from rope_table()")
    if T == 0:
        return
    _rope_store_kv_kernel[(T,)](
        qkv, positions, slots, k_cache, v_cache, cos_sin,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos_sin.stride(0),
        HQ=n_heads, HKV=n_kv_heads, BLOCK_HQ=triton.next_power_of_2(n_heads),
        BLOCK_HKV=triton.next_power_of_2(n_kv_heads), HEAD_DIM=D, num_warps=4)


# ----------------------------------------------------------------------------- attention
@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, n0, q_pos, kv_end, stride_cs, qk_scale,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_cs + offs_d[:, None]   # (D, BLOCK_N)
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_cs + offs_d[None, :]   # (BLOCK_N, D)
    if MASKED:
        kmask = offs_n < kv_end
        k = tl.load(k_ptrs, mask=kmask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k) * qk_scale
    if MASKED:
        qk = tl.where((offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < kv_end), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["slot", "start_pos", "T"])
def _prefill_attn_kernel(q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, slot, start_pos, T, qk_scale,
                         stride_qt, stride_ot, stride_oh, stride_cb, stride_ch, stride_cs,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)                              # q head (fastest: heads of a kv group share L2)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)   # longest (last) q blocks first
    kvh = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qt + h * HEAD_DIM + offs_d[None, :],
                mask=offs_m[:, None] < T, other=0.0)
    q_pos = start_pos + offs_m
    cache_off = slot.to(tl.int64) * stride_cb + kvh.to(tl.int64) * stride_ch
    k_base = k_cache_ptr + cache_off
    v_base = v_cache_ptr + cache_off
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = ((start_pos + start_m * BLOCK_M) // BLOCK_N) * BLOCK_N   # keys every row of the block sees
    kv_end = start_pos + tl.minimum(T, (start_m + 1) * BLOCK_M)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, n0, q_pos, kv_end, stride_cs, qk_scale,
                                   False, BLOCK_N, HEAD_DIM)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, n0, q_pos, kv_end, stride_cs, qk_scale,
                                   True, BLOCK_N, HEAD_DIM)
    acc = acc / l_i[:, None]
    o_ptrs = o_ptr + offs_m[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < T)


def _default_config(T: int, head_dim: int):
    # (BLOCK_M, BLOCK_N, num_warps, num_stages); overridden by benchmarks/bench_prefill_attention.py sweeps
    if T <= 64:
        return 64, 64, 4, 2
    return 128, 64, 8, 3


def prefill_attention_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int,
                             start_pos: int, out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """Attention only (K/V already in the cache, q already rotated). q (T, Hq, D) (any row stride, e.g. a
    view of qkv); keys of slot `slot` at positions [0, start_pos + T). Returns out (T, Hq, D)."""
    if q.dim() != 3 or q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        raise ValueError(f"q must be (T, Hq, D) with heads packed in each row, got {tuple(q.shape)} {q.stride()}")
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    _check_cache(k_cache, v_cache, Hkv, D, q.dtype)
    if Hq % Hkv:
        raise ValueError(f"q heads {Hq} not a multiple of kv heads {Hkv}")
    if not 0 <= slot < k_cache.shape[0]:
        raise ValueError(f"slot {slot} outside the cache's {k_cache.shape[0]} slots")
    if start_pos < 0 or start_pos + T > k_cache.shape[2]:
        raise ValueError(f"positions {start_pos}..{start_pos + T} exceed the cache's max_seq {k_cache.shape[2]}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {D} unsupported (power of two 16..256)")
    o = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device) if out is None else out
    if o.shape != (T, Hq, D) or o.stride(2) != 1:
        raise ValueError(f"out must be ({T}, {Hq}, {D}) with a contiguous last dim")
    if T == 0:
        return o
    bm, bn, nw, ns = config or _default_config(T, D)
    qk_scale = D ** -0.5 * 1.4426950408889634  # log2(e): softmax in base 2
    grid = (Hq, triton.cdiv(T, bm))
    _prefill_attn_kernel[grid](q, k_cache, v_cache, o, slot, start_pos, T, qk_scale,
                               q.stride(0), o.stride(0), o.stride(1),
                               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                               GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    return o


def prefill_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int,
                      start_pos: int, cos_sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                      positions: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """Full prefill step for one sequence: rotate q (in place in qkv) and k, write k/v of the T new tokens
    to k_cache/v_cache[slot, :, start_pos:start_pos+T], then causal attention over [0, start_pos+T).
    qkv (T, (Hq+2Hkv)*D) -> out (T, Hq, D). positions/slots (T,) device tensors may be passed to avoid
    building them here."""
    T = qkv.shape[0]
    D = k_cache.shape[-1]
    if positions is None:
        positions = torch.arange(start_pos, start_pos + T, device=qkv.device, dtype=torch.int32)
    if slots is None:
        slots = torch.full((T,), slot, device=qkv.device, dtype=torch.int32)
    if not 0 <= slot < k_cache.shape[0]:
        raise ValueError(f"slot {slot} outside the cache's {k_cache.shape[0]} slots")
    if start_pos < 0 or start_pos + T > k_cache.shape[2]:
        raise ValueError(f"positions {start_pos}..{start_pos + T} exceed the cache's max_seq {k_cache.shape[2]}")
    if start_pos + T > cos_sin.shape[0]:
        raise ValueError(f"positions up to {start_pos + T} exceed the RoPE table ({cos_sin.shape[0]})")
    rope_store_kv(qkv, positions, slots, k_cache, v_cache, cos_sin, n_heads, n_kv_heads)
    q = qkv[:, :n_heads * D].view(T, n_heads, D)
    return prefill_attention_cached(q, k_cache, v_cache, slot, start_pos, out=out, config=config)
