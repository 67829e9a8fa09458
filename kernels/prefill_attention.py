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
  1. rope_store_kv: per block of tokens x group of heads, rotate q IN PLACE inside qkv, rotate k and write
     k, v to the cache (whole-row 16-byte loads, pairs split in registers; H200: 37 us per 4k tokens vs 315 us
     for one token per program, 4.9 vs 13.7 us for the 1-token decode launch). The
     cos/sin come from a table of fp32 angles built once (`rope_table`), so they match the reference
     bit for bit. Also used by the decode step (positions/slots read from device memory) and, with
     slots = page ids and cache_pos = position % P, to write the paged cache of paged_*_attention.py.
  2. _prefill_attn_kernel: flash attention (online softmax, exp2) over cache positions [0, start_pos+T):
     blocks fully below the diagonal run without masks, the diagonal band with the causal mask.
  Why not one launch: a q block needs the K of every earlier new token, written by other programs of
  the same launch (a grid-wide dependency), or re-rotated per q block (sin/cos in the inner loop).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.dot_precision import dot_precision
from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported

from pixtral_rt.reference.rope import text_rope_angles


def rope_table(max_seq: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(max_seq, D/2, 2) fp32: [cos, sin] of the reference's fp32 angles pos * theta^(-2i/D)."""
    ang = text_rope_angles(torch.arange(max_seq, device=device), head_dim, theta)
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1).contiguous()


# ----------------------------------------------------------------------------- RoPE + cache write
@triton.jit
def _rope_store_kv_kernel(qkv_ptr, pos_ptr, slot_ptr, cpos_ptr, k_cache_ptr, v_cache_ptr, cs_ptr, T,
                          stride_qkv, stride_cb, stride_ch, stride_cs, stride_tab,
                          HQ: tl.constexpr, HKV: tl.constexpr, HPP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr):
    # program (tb, hg): tokens tb*BLOCK_T.., heads hg*HPP..hg*HPP+HPP-1 of the (HQ q heads | HKV kv heads) list;
    # a kv head's program rotates k into the cache and copies v. Rows are loaded whole (contiguous 16-byte
    # vectors) and split into (even, odd) pairs in registers; cos/sin loaded once per token block.
    # Token t's k/v go to row cpos[t] of slot slot[t] (cpos = pos for the static cache, pos % P for pages).
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = (offs_t < T)[:, None]
    hg = tl.program_id(1)
    pos = tl.load(pos_ptr + offs_t, mask=offs_t < T, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)[None, :]
    cs = tl.load(cs_ptr + pos[:, None] * stride_tab + d, mask=tmask, other=0.0)       # (BLOCK_T, D) fp32
    c, s = tl.split(tl.reshape(cs, (BLOCK_T, HEAD_DIM // 2, 2)))
    rows = qkv_ptr + offs_t[:, None].to(tl.int64) * stride_qkv
    if hg < HQ // HPP:
        for j in range(HPP):
            ptrs = rows + (hg * HPP + j) * HEAD_DIM + d
            x = tl.load(ptrs, mask=tmask, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(x, (BLOCK_T, HEAD_DIM // 2, 2)))
            y = tl.reshape(tl.join(xe * c - xo * s, xe * s + xo * c), (BLOCK_T, HEAD_DIM))
            tl.store(ptrs, y.to(qkv_ptr.dtype.element_ty), mask=tmask)
    else:
        slot = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=0).to(tl.int64)
        cpos = tl.load(cpos_ptr + offs_t, mask=offs_t < T, other=0).to(tl.int64)
        dst0 = slot[:, None] * stride_cb + cpos[:, None] * stride_cs + d
        for j in range(HPP):
            kvh = (hg - HQ // HPP) * HPP + j
            kp = rows + (HQ + kvh) * HEAD_DIM + d
            x = tl.load(kp, mask=tmask, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(x, (BLOCK_T, HEAD_DIM // 2, 2)))
            y = tl.reshape(tl.join(xe * c - xo * s, xe * s + xo * c), (BLOCK_T, HEAD_DIM))
            dst = dst0 + kvh * stride_ch
            tl.store(k_cache_ptr + dst, y.to(k_cache_ptr.dtype.element_ty), mask=tmask)
            v = tl.load(kp + HKV * HEAD_DIM, mask=tmask, other=0.0)
            tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=tmask)


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
                  v_cache: torch.Tensor, cos_sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                  pdl: bool = False, block_t: int | None = None, heads_per_program: int | None = None,
                  cache_pos: torch.Tensor | None = None) -> None:
    """In place: rotate q inside qkv (T, (Hq+2Hkv)*D); write rotated k and v of token t to
    k_cache/v_cache[slots[t], :, cache_pos[t]]. positions (RoPE angles), slots, cache_pos (row inside the slot;
    default: positions): (T,) int32/int64 on the device. Paged cache (n_pages, Hkv, P, D): slots = page ids
    block_table[pos // P], cache_pos = pos % P. cos_sin: rope_table(...) (max_seq, D/2, 2) fp32. Capturable
    (no host sync). pdl: launch as a programmatic dependent launch (waits on the previous grid before any
    access; sm90+)."""
    D = k_cache.shape[-1]
    T = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * D or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be (T, {(n_heads + 2 * n_kv_heads) * D}) row-major, got {tuple(qkv.shape)}")
    _check_cache(k_cache, v_cache, n_kv_heads, D, qkv.dtype)
    if positions.shape != (T,) or slots.shape != (T,):
        raise ValueError(f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must be ({T},)")
    if cache_pos is None:
        cache_pos = positions
    elif cache_pos.shape != (T,) or cache_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_pos must be ({T},) int32/int64, got {tuple(cache_pos.shape)} {cache_pos.dtype}")
    if cos_sin.dtype != torch.float32 or cos_sin.shape[1:] != (D // 2, 2) or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin must be a contiguous (max_seq, {D // 2}, 2) fp32 table from rope_table()")
    if T == 0:
        return
    # decode (few tokens): one head per program, for parallelism; prefill: 8 tokens x a group of heads per
    # program (cos/sin loaded once per group, 2-4 KB contiguous rows per head)
    bt = block_t or (2 if T <= 2 else 8 if T <= 64 else 16)
    hpp = heads_per_program or (1 if T <= 64 else math.gcd(math.gcd(n_heads, n_kv_heads), 8))
    if n_heads % hpp or n_kv_heads % hpp:
        raise ValueError(f"heads_per_program {hpp} must divide n_heads {n_heads} and n_kv_heads {n_kv_heads}")
    if pdl and not pdl_supported(qkv.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    _rope_store_kv_kernel[(triton.cdiv(T, bt), (n_heads + n_kv_heads) // hpp)](
        qkv, positions, slots, cache_pos, k_cache, v_cache, cos_sin, T,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos_sin.stride(0),
        HQ=n_heads, HKV=n_kv_heads, HPP=hpp, HEAD_DIM=D, BLOCK_T=bt, USE_PDL=pdl, num_warps=4, **extra)


# ----------------------------------------------------------------------------- attention
@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, n0, q_pos, kv_end, stride_cs, qk_scale,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
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
    qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = tl.where((offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < kv_end), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["slot", "start_pos", "T"])
def _prefill_attn_kernel(q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, slot, start_pos, T, qk_scale,
                         stride_qt, stride_ot, stride_oh, stride_cb, stride_ch, stride_cs,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
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
                                   False, BLOCK_N, HEAD_DIM, PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, n0, q_pos, kv_end, stride_cs, qk_scale,
                                   True, BLOCK_N, HEAD_DIM, PRECISION)
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
                               GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                               PRECISION=dot_precision(q.dtype), num_warps=nw, num_stages=ns)
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
