"""Split-KV decode attention (flash-decoding) over a PAGED KV cache, for continuous batching (GQA, head_dim 128).

    q (B, Hq, D)            rotated queries of one new token per sequence (a strided view of the qkv GEMM output
                            is fine: any batch/head strides, last dim contiguous)
    k_pages, v_pages        (n_pages, Hkv, P, D), last dim contiguous, K RoPE-rotated: sequence b keeps
                            position p at page block_table[b, p // P], row p % P
    block_table             (>= B rows, max_pages) int32; entries at or past cdiv(cache_lens[b], P) are never read
    cache_lens              (B,) int32 (<= max_pages * P, the caller's contract: checking it would need a host sync)
    out (B, Hq, D):         out[b, h] = softmax_j(q[b,h] . k_j * D^-0.5) v_j  over j < cache_lens[b],
                            kv head of q head h = h // (Hq / Hkv); cache_lens[b] == 0 (idle batch row) -> zeros

Two launches:
  1. _paged_decode_split_kernel, grid (num_splits, Hkv, B): program (s, g, b)
     takes the s-th of num_splits equal chunks of [0, cache_lens[b]) (rounded up to BLOCK_N) and serves all
     Hq/Hkv query heads of kv group g from one read of each K/V tile. BLOCK_N divides P and chunks start on
     BLOCK_N multiples, so a tile never crosses a page: one table entry per tile, then the same contiguous
     (BLOCK_N, D) loads as a contiguous cache would.
  2. _decode_reduce_kernel, grid (B, Hq): log-sum-exp merge of the partials.
CUDA-graph capturable: lengths and the table are read from device memory; the grid depends only on B and
num_splits (default_num_splits: from B, Hkv and the SM count, never from the lengths).
(The contiguous-cache decode kernel this one grew from, kernels/decode_attention.py, was removed with the
static KV cache; its measurements stay in benchmarks/results/decode_attention.jsonl.)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pixtral_rt.kernels.dot_precision import dot_precision
from pixtral_rt.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _paged_decode_split_kernel(q_ptr, k_pages_ptr, v_pages_ptr, table_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr,
                               qk_scale, stride_qb, stride_qh, stride_pn, stride_ph, stride_ps, stride_tb,
                               NUM_SPLITS, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                               PAGE: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
                               PRECISION: tl.constexpr):
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
    offs_n = tl.arange(0, BLOCK_N)                   # row inside the tile
    hmask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None], other=0.0)   # (BLOCK_H, D): the group's heads, padded to the MMA's 16 rows
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    head_off = kvh.to(tl.int64) * stride_ph
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        # keys n0 .. n0 + BLOCK_N - 1 all sit in page table[b, n0 // P], rows n0 % P ..
        page = tl.load(table_row + n0 // PAGE).to(tl.int64)
        tile = page * stride_pn + head_off + (n0 % PAGE) * stride_ps
        nmask = n0 + offs_n < end
        k = tl.load(k_pages_ptr + tile + offs_n[None, :] * stride_ps + offs_d[:, None],
                    mask=nmask[None, :], other=0.0)                                     # (D, BLOCK_N)
        v = tl.load(v_pages_ptr + tile + offs_n[:, None] * stride_ps + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)                                     # (BLOCK_N, D)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    # partials laid out (B, Hq, NUM_SPLITS[, D]) as _decode_reduce_kernel reads them; an empty split leaves
    # m = -inf, l = 0, acc = 0
    row = (b * (tl.num_programs(1) * GROUP) + heads).to(tl.int64) * NUM_SPLITS + split
    tl.store(pm_ptr + row, m_i, mask=hmask)
    tl.store(pl_ptr + row, l_i, mask=hmask)
    tl.store(po_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=hmask[:, None])


# ----------------------------------------------------------------------------- checks shared with
# paged_prefill_attention.py
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


def _check_pages(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> tuple[int, int]:
    """q (..., Hq, D) against k_pages/v_pages (n_pages, Hkv, P, D) -> (Hkv, P)."""
    Hq, D = q.shape[-2:]
    if k_pages.dim() != 4 or k_pages.shape[3] != D or k_pages.stride(3) != 1:
        raise ValueError(f"k_pages must be (n_pages, Hkv, P, {D}) with a contiguous last dim, "
                         f"got {tuple(k_pages.shape)} strides {k_pages.stride()}")
    if v_pages.shape != k_pages.shape or v_pages.stride() != k_pages.stride():
        raise ValueError(f"v_pages must match k_pages' shape {tuple(k_pages.shape)} and strides {k_pages.stride()}, "
                         f"got {tuple(v_pages.shape)} {v_pages.stride()}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"k_pages/v_pages dtype {k_pages.dtype}/{v_pages.dtype} != q dtype {q.dtype}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {D} unsupported (power of two 16..256)")
    Hkv = k_pages.shape[1]
    if Hq % Hkv:
        raise ValueError(f"q heads {Hq} not a multiple of kv heads {Hkv}")
    return Hkv, k_pages.shape[2]


def _check_int32(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype != torch.int32 or t.device != device:
        raise ValueError(f"{name} must be an int32 tensor on {device}, got {t.dtype} on {t.device}")


def _check_table(block_table: torch.Tensor, min_rows: int, device: torch.device) -> None:
    if block_table.dim() != 2 or block_table.shape[0] < min_rows or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be (rows >= {min_rows}, max_pages) with a contiguous last dim, "
                         f"got {tuple(block_table.shape)} strides {block_table.stride()}")
    _check_int32("block_table", block_table, device)


def _tile_n(block_n: int, page: int) -> int:
    """Key-tile size: block_n capped at the page size, and dividing it (a tile never crosses a page)."""
    bn = min(block_n, page)
    if bn < 16 or bn & (bn - 1) or page % bn:
        raise ValueError(f"block_n {block_n} with page size {page}: need a power of two >= 16 dividing the page "
                         f"size (min(block_n, P) = {bn})")
    return bn


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, cache_lens: torch.Tensor, num_splits: int | None = None,
                           block_n: int = 64, num_warps: int = 4, num_stages: int = 3, pdl: bool = False,
                           workspace: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, D), k_pages/v_pages (n_pages, Hkv, P, D), block_table (>= B, max_pages) int32,
    cache_lens (B,) int32 -> out (B, Hq, D). block_n is capped at P (key tiles stay inside a page).
    pdl: both launches as programmatic dependent launches (sm90+). workspace: a dict the caller keeps; the fp32
    partials are allocated into it once per (B, Hq, num_splits, D, device), the same keys and buffers as
    decode_attention's, so one dict can serve both."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be (B, Hq, D) with a contiguous last dim, got {tuple(q.shape)} {q.stride()}")
    B, Hq, D = q.shape
    Hkv, P = _check_pages(q, k_pages, v_pages)
    _check_table(block_table, B, q.device)
    if cache_lens.shape != (B,):
        raise ValueError(f"cache_lens must be ({B},), got {tuple(cache_lens.shape)}")
    _check_int32("cache_lens", cache_lens, q.device)
    bn = _tile_n(block_n, P)
    o = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device) if out is None else out
    if o.shape != (B, Hq, D) or o.stride(2) != 1 or o.dtype != q.dtype:
        raise ValueError(f"out must be ({B}, {Hq}, {D}) {q.dtype} with a contiguous last dim, "
                         f"got {tuple(o.shape)} {o.dtype}")
    ns = num_splits or default_num_splits(B, Hkv, q.device)
    po, pm, pl = split_partials(workspace, B, Hq, ns, D, q.device)
    if pdl and not pdl_supported(q.device):
        pdl = False
    extra = dict(launch_pdl=True) if pdl else {}
    group = Hq // Hkv
    qk_scale = D ** -0.5 * 1.4426950408889634  # log2(e): softmax in base 2
    _paged_decode_split_kernel[(ns, Hkv, B)](
        q, k_pages, v_pages, block_table, cache_lens, po, pm, pl, qk_scale,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), block_table.stride(0),
        ns, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE=P,
        BLOCK_N=bn, USE_PDL=pdl, PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **extra)
    _decode_reduce_kernel[(B, Hq)](po, pm, pl, o, o.stride(0), o.stride(1), ns,
                                   BLOCK_S=triton.next_power_of_2(ns), HEAD_DIM=D, USE_PDL=pdl, num_warps=4, **extra)
    return o
