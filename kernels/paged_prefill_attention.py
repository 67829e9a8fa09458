"""Varlen chunked-prefill attention over a PAGED KV cache: the new tokens of several sequences in one launch
(causal GQA, head_dim 128).

    q (T, Hq, D)            rotated queries of the new tokens of S sequences, packed (a strided view of the qkv
                            GEMM output is fine: any token/head strides, last dim contiguous); sequence s owns
                            rows cu_q[s] .. cu_q[s+1] - 1, row t of it sits at position start_pos[s] + t - cu_q[s]
    cu_q (S+1,), start_pos (S,)   int32 device; start_pos[s] = tokens already cached before this chunk
                            (prefix-cache hits, earlier chunks); a sequence may have no new tokens
    k_pages, v_pages        (n_pages, Hkv, P, D), the layout of paged_decode_attention.py: sequence s keeps
                            position p at page block_table[s, p // P], row p % P; the chunk's own K/V are
                            already written (rope_store_kv with slots = page ids, cache_pos = position % P)
    block_table             (>= S rows, max_pages) int32; entries past a sequence's last position never read
    out (T, Hq, D):         out[t, h] = softmax_j(q_t . k_j * D^-0.5) v_j over keys j <= position of t (its own
                            sequence), kv head of q head h = h // (Hq / Hkv)

One launch, _paged_prefill_attn_kernel, grid (Hq, S, cdiv(max_q_len, BLOCK_M)): program (h, s, m) takes q block m
of sequence s (it returns at once if the sequence has fewer rows) and runs prefill_attention.py's flash loop
(online softmax in exp2; key blocks fully below the diagonal unmasked, the diagonal band masked), reusing
its _attn_tile. BLOCK_N divides P, so a key tile lies inside one page: one table entry per tile (loaded one
tile ahead with prefetch_table, the default for chunks over 64 tokens).
CUDA-graph capturable for a fixed (T, S, max_q_len): offsets, positions and the table come from device memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.dot_precision import dot_precision
from pixtral_rt.kernels.paged_decode_attention import _check_int32, _check_pages, _check_table, _tile_n
from pixtral_rt.kernels.prefill_attention import _attn_tile, _default_config


@triton.jit
def _page_rebase(table_row, n0, head_off, stride_pn, stride_ps, PAGE: tl.constexpr):
    # _attn_tile addresses key n (n0 <= n < n0 + BLOCK_N) at base + n * stride_ps, as in a contiguous cache.
    # Return the base (an element offset, possibly negative) that puts key n at row n % P of its page
    # table_row[n0 // P]: page start minus the page's first position times the row stride.
    page = tl.load(table_row + n0 // PAGE).to(tl.int64)
    return page * stride_pn + head_off - (n0 // PAGE * PAGE) * stride_ps


@triton.jit
def _next_base(table_row, n0, kv_end, base, head_off, stride_pn, stride_ps, PAGE: tl.constexpr,
               BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    # (base of this tile, base of the next). PREFETCH: the next tile's page id is loaded one iteration ahead
    # (a loop-carried value), so no K/V load waits on the table load of its own iteration; the entry past
    # the last tile is not read (the table row may end there).
    if PREFETCH:
        n1 = n0 + BLOCK_N
        page = tl.load(table_row + n1 // PAGE, mask=n1 < kv_end, other=0).to(tl.int64)
        return base, page * stride_pn + head_off - (n1 // PAGE * PAGE) * stride_ps
    else:
        return _page_rebase(table_row, n0, head_off, stride_pn, stride_ps, PAGE), base


@triton.jit
def _paged_prefill_attn_kernel(q_ptr, k_pages_ptr, v_pages_ptr, o_ptr, table_ptr, cu_q_ptr, start_pos_ptr, qk_scale,
                               stride_qt, stride_qh, stride_ot, stride_oh, stride_pn, stride_ph, stride_ps, stride_tb,
                               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                               PREFETCH: tl.constexpr):
    h = tl.program_id(0)                              # q head (fastest: heads of a kv group share L2)
    s = tl.program_id(1)
    start_m = tl.num_programs(2) - 1 - tl.program_id(2)   # last (longest) q blocks of every sequence first
    row0 = tl.load(cu_q_ptr + s)
    T = tl.load(cu_q_ptr + s + 1) - row0              # new tokens of sequence s
    if start_m * BLOCK_M >= T:
        return
    start_pos = tl.load(start_pos_ptr + s)
    kvh = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)    # row inside the sequence's chunk
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (row0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=offs_m[:, None] < T, other=0.0)
    q_pos = start_pos + offs_m
    table_row = table_ptr + s.to(tl.int64) * stride_tb
    head_off = kvh.to(tl.int64) * stride_ph
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = ((start_pos + start_m * BLOCK_M) // BLOCK_N) * BLOCK_N   # keys every row of the block sees
    kv_end = start_pos + tl.minimum(T, (start_m + 1) * BLOCK_M)
    nxt = _page_rebase(table_row, 0, head_off, stride_pn, stride_ps, PAGE)   # the first tile's (PREFETCH)
    for n0 in range(0, full_end, BLOCK_N):
        base, nxt = _next_base(table_row, n0, kv_end, nxt, head_off, stride_pn, stride_ps, PAGE, BLOCK_N, PREFETCH)
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_pages_ptr + base, v_pages_ptr + base, n0, q_pos, kv_end,
                                   stride_ps, qk_scale, False, BLOCK_N, HEAD_DIM, PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        base, nxt = _next_base(table_row, n0, kv_end, nxt, head_off, stride_pn, stride_ps, PAGE, BLOCK_N, PREFETCH)
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_pages_ptr + base, v_pages_ptr + base, n0, q_pos, kv_end,
                                   stride_ps, qk_scale, True, BLOCK_N, HEAD_DIM, PRECISION)
    acc = acc / l_i[:, None]   # every valid row sees at least its own key: l_i > 0
    o_ptrs = o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < T)


def _paged_default_config(max_q_len: int, head_dim: int, n_seqs: int = 1):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, prefetch_table). Up to 64 tokens prefill_attention's own tiles.
    One sequence of up to 4096 tokens: 64 x 64, 4 warps, 3 stages with the page ids loaded one tile ahead
    (_next_base): twice the programs of 128-row tiles, which a lone prompt needs to fill the GPU (H100,
    benchmarks/bench_paged_attention.py, results/paged_attention.jsonl: 1 x 1024 / 1 x 2048 fresh 234.9 / 327.0
    TFLOP/s against 213.8 / 304.2 with the tiles below, commit c8d98e9; 1 x 4096 388.5 against 380.8, d5a90ca).
    Otherwise 128 x 64, 8 warps, 5 stages, prefetched: the best where several chunks or a cached prefix give
    every program more keys (4 x 1024 new over 3072 cached 395 TFLOP/s against 366 with 64 x 64 x 4 x 3, d5a90ca;
    1 x 7616 413 against 398)."""
    if max_q_len <= 64:
        return (*_default_config(max_q_len, head_dim), False)
    if n_seqs == 1 and max_q_len <= 4096:
        return 64, 64, 4, 3, True
    return 128, 64, 8, 5, True


def paged_prefill_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                            block_table: torch.Tensor, cu_q: torch.Tensor, start_pos: torch.Tensor, max_q_len: int,
                            out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            prefetch_table: bool | None = None) -> torch.Tensor:
    """Attention only (K/V already in the pages, q already rotated). q (T, Hq, D), k_pages/v_pages
    (n_pages, Hkv, P, D), block_table (>= S, max_pages), cu_q (S+1,), start_pos (S,) int32 device tensors;
    max_q_len: host int >= every cu_q[s+1] - cu_q[s] (sets the grid only; rows past it are not computed).
    Tiles: prefill_attention's defaults for a chunk of max_q_len tokens unless given; block_n is capped at P.
    Returns out (T, Hq, D)."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be (T, Hq, D) with a contiguous last dim, got {tuple(q.shape)} {q.stride()}")
    T, Hq, D = q.shape
    Hkv, P = _check_pages(q, k_pages, v_pages)
    if start_pos.dim() != 1:
        raise ValueError(f"start_pos must be (S,), got {tuple(start_pos.shape)}")
    S = start_pos.shape[0]
    _check_int32("start_pos", start_pos, q.device)
    if cu_q.shape != (S + 1,):
        raise ValueError(f"cu_q must be (S + 1,) = ({S + 1},) for start_pos of S = {S}, got {tuple(cu_q.shape)}")
    _check_int32("cu_q", cu_q, q.device)
    _check_table(block_table, S, q.device)
    if not 0 <= max_q_len <= T:
        raise ValueError(f"max_q_len {max_q_len} must lie in 0..T = {T} (the longest chunk)")
    o = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device) if out is None else out
    if o.shape != (T, Hq, D) or o.stride(2) != 1 or o.dtype != q.dtype:
        raise ValueError(f"out must be ({T}, {Hq}, {D}) {q.dtype} with a contiguous last dim, "
                         f"got {tuple(o.shape)} {o.dtype}")
    bm, bn, nw, ns, pf = _paged_default_config(max_q_len, D, S)
    bm, nw, ns = block_m or bm, num_warps or nw, num_stages or ns
    bn = _tile_n(block_n or bn, P)
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m {bm} must be a power of two >= 16")
    if max_q_len == 0 or S == 0:
        return o
    qk_scale = D ** -0.5 * 1.4426950408889634  # log2(e): softmax in base 2
    _paged_prefill_attn_kernel[(Hq, S, triton.cdiv(max_q_len, bm))](
        q, k_pages, v_pages, o, block_table, cu_q, start_pos, qk_scale,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), block_table.stride(0),
        GROUP=Hq // Hkv, HEAD_DIM=D, PAGE=P, BLOCK_M=bm, BLOCK_N=bn, PRECISION=dot_precision(q.dtype),
        PREFETCH=pf if prefetch_table is None else bool(prefetch_table), num_warps=nw, num_stages=ns)
    return o
