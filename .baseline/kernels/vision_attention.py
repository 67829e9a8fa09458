"""Block-diagonal (varlen) flash attention for the Pixtral vision encoder, with 2D RoPE fused.

    out[n, h] = softmax_j( rope(q[n, h]) . rope(k[j, h]) * scale ) v[j, h],   j in the image of n

Non-causal. All images of a request are packed into ONE sequence of N tokens; `cu_seqlens` (int32,
n_segments + 1) marks the image boundaries. A query tile of BLOCK_M rows lies inside one image and visits
only that image's key tiles: the host plans the tiles once per request (`plan_vision_attention`), longest
images first (better tail balance), padded with -1 entries to a fixed count so that one plan shape serves a
whole patch-count bucket and the launch can be captured in a CUDA graph (no .item(), no host sync).

RoPE (Mistral's 2D vision RoPE, `pixtral_rt/reference/rope.py`): pair i of a head (D/2 pairs) turns by
    angle[n, i] = row[n] * freq[2i]              for i <  D/4
                  col[n] * freq[2(i - D/4) + 1]  for i >= D/4,      freq[k] = theta^(-2k/D)   (fp32)
applied as a complex product to (x_even[i], x_odd[i]). Where the pair lives in memory is `layout`:
    "interleaved": (x[2i], x[2i+1])       -- Mistral's own layout (checkpoint weights as they are)
    "half":        (x[i],  x[D/2 + i])    -- rotate-half layout (HF-permuted wq/wk rows): contiguous loads
q.k is invariant to a permutation of D applied to both, so the kernel never un-permutes: with RoPE fused it
computes S = q_even' k_even'^T + q_odd' k_odd'^T (two dots of K = D/2); without, one dot over D.

Shapes: q, k, v (N, H, D) fp16/bf16, last dim contiguous (views into a fused (N, 3, H, D) qkv buffer are
fine); positions (N, 2) int32 (row, col); out (N, H, D) contiguous. head_dim 64 and 88 (88 is padded to 128
inside: masked loads, the padding never touches memory). fp32 accumulation, exp2-based online softmax.

`rope=False` skips the rotation (inputs already rotated, e.g. by kernels/rope_2d.py: what the encoder runs).
Call `warmup_vision_attention` (autotuning) before capturing a CUDA graph.

Tiles: BLOCK_M query rows (the plan's) x BLOCK_N keys. On Hopper with head_dim 64 the encoder plans 64-row
tiles (one warpgroup) and the full K / V tiles come through TMA descriptors (host-side
`triton.tools.tensor_descriptor`, a (BLOCK_N, D) box over the (N, H*D) row-strided view; the image's partial
last tile keeps masked pointer loads, so no box reads the next image); elsewhere 128-row tiles and pointer
loads. Measured choices and the options that lost: docs/NOTES.md, benchmarks/sweep_vision_attention.py.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pixtral_rt import compile_events as _compile_events

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------- host plan
@dataclass
class VisionAttentionPlan:
    """Device-side schedule of query tiles. tiles (2, max_tiles) int32: row 0 = segment index (-1 = idle
    program), row 1 = first query row of the tile. block_m is the BLOCK_M the tiles were cut for."""
    tiles: torch.Tensor
    block_m: int

    @property
    def max_tiles(self) -> int:
        return self.tiles.shape[1]


def plan_tiles(seqlens: list[int], block_m: int, max_tiles: int | None = None):
    """Host-side (plain Python): query tiles of every segment, longest segments first. Returns an int32
    numpy-free list pair [[seg...], [row0...]] padded with (-1, 0) to max_tiles."""
    starts, s = [], 0
    for n in seqlens:
        starts.append(s)
        s += n
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    segs, rows = [], []
    for i in order:
        for m in range(0, seqlens[i], block_m):
            segs.append(i)
            rows.append(starts[i] + m)
    if max_tiles is None:
        max_tiles = max(len(segs), 1)
    if len(segs) > max_tiles:
        raise ValueError(f"max_tiles={max_tiles} is too small for {len(segs)} query tiles of {block_m} rows "
                         f"(segment lengths {seqlens}); use max_tiles_for(...)")
    pad = max_tiles - len(segs)
    return [segs + [-1] * pad, rows + [0] * pad]


def max_tiles_for(max_tokens: int, max_segments: int, block_m: int) -> int:
    """Upper bound on the tile count of any pack of <= max_segments segments with <= max_tokens tokens,
    rounded up to a multiple of 16 so that every plan shares one Triton specialisation of the kernel."""
    bound = (max_tokens + block_m - 1) // block_m + max_segments
    return -(-bound // 16) * 16


def plan_vision_attention(seqlens: list[int], block_m: int = 128, max_tiles: int | None = None,
                          device=None) -> VisionAttentionPlan:
    """seqlens: tokens per image (the segments of cu_seqlens, in order). Copies the plan to `device` once."""
    t = torch.tensor(plan_tiles(list(map(int, seqlens)), block_m, max_tiles), dtype=torch.int32)
    return VisionAttentionPlan(tiles=t.to(device) if device is not None else t, block_m=block_m)


def rope_pair_freqs(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(next_pow2(D/2),) fp32: the frequency of pair i (row part, then column part), zero-padded.
    Built from the reference's rope_frequencies so the fp32 angles match bit for bit."""
    from pixtral_rt.reference.rope import rope_frequencies
    f = rope_frequencies(head_dim, theta)
    pair = torch.cat([f[0::2], f[1::2]])
    half_p = triton.next_power_of_2(head_dim // 2)
    out = torch.zeros(half_p, dtype=torch.float32)
    out[: pair.numel()] = pair
    return out.to(device) if device is not None else out


# --------------------------------------------------------------------------------------------- kernel
@triton.jit
def _rotate(xe, xo, pos_ptr, rows, row_mask, stride_pn, freq, offs_i, QUARTER: tl.constexpr):
    # xe, xo (R, HALF) fp32: the two halves of each pair; rows (R,) token indices -> rotated halves
    r = tl.load(pos_ptr + rows * stride_pn, mask=row_mask, other=0)
    c = tl.load(pos_ptr + rows * stride_pn + 1, mask=row_mask, other=0)
    p = tl.where(offs_i[None, :] < QUARTER, r[:, None], c[:, None]).to(tl.float32)
    ang = p * freq[None, :]
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    return xe * cs - xo * sn, xe * sn + xo * cs


@triton.jit
def _load_kv(X, DESC, start, seq_end, offs_n, h, stride_n, stride_h, offs_d, HEAD_DIM: tl.constexpr,
             DP: tl.constexpr, MASKED: tl.constexpr, KV_DESC: tl.constexpr):
    # (BLOCK_N, DP) tile of k or v: rows [start, start + BLOCK_N) of head h. MASKED: rows past the image's end
    # read as 0 (they belong to the next image or to padding, which may hold anything, NaN included).
    # KV_DESC: a TMA box load (full tiles only).
    if KV_DESC and not MASKED:
        x = DESC.load([start, h * HEAD_DIM])
    else:
        cols = start + offs_n
        cmask = cols < seq_end
        xp = X + cols[:, None] * stride_n + h * stride_h + offs_d[None, :]
        if MASKED:
            if DP != HEAD_DIM:
                x = tl.load(xp, mask=cmask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            else:
                x = tl.load(xp, mask=cmask[:, None], other=0.0)
        else:
            if DP != HEAD_DIM:
                x = tl.load(xp, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                x = tl.load(xp)
    return x


@triton.jit
def _scores(q, qe, qo, K, DESC_K, POS, freq, offs_i, offs_d, start, seq_end, offs_n, h, stride_kn, stride_kh,
            stride_pn, HEAD_DIM: tl.constexpr, DP: tl.constexpr, QUARTER: tl.constexpr, PAIR_STRIDE: tl.constexpr,
            ODD_OFF: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr, KV_DESC: tl.constexpr):
    # S = q k^T (BLOCK_M, BLOCK_N) fp32 for key rows [start, start + BLOCK_N); with ROPE the keys are rotated
    # first (q already is)
    cols = start + offs_n
    cmask = cols < seq_end
    if ROPE:
        imask = offs_i < HEAD_DIM // 2
        kp = K + cols[:, None] * stride_kn + h * stride_kh + (offs_i * PAIR_STRIDE)[None, :]
        if MASKED:
            lm = cmask[:, None] & imask[None, :]
        else:
            lm = imask[None, :]
        ke = tl.load(kp, mask=lm, other=0.0).to(tl.float32)
        ko = tl.load(kp + ODD_OFF, mask=lm, other=0.0).to(tl.float32)
        ke, ko = _rotate(ke, ko, POS, cols, cmask, stride_pn, freq, offs_i, QUARTER)
        qk = tl.dot(qe, tl.trans(ke.to(qe.dtype)))
        qk = tl.dot(qo, tl.trans(ko.to(qo.dtype)), qk)
    else:
        k = _load_kv(K, DESC_K, start, seq_end, offs_n, h, stride_kn, stride_kh, offs_d, HEAD_DIM, DP, MASKED,
                     KV_DESC)
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(cmask[None, :], qk, float("-inf"))
    return qk


@triton.jit
def _softmax_pv(qk, acc, l_i, m_i, V, DESC_V, offs_d, start, seq_end, offs_n, h, stride_vn, stride_vh, qk_scale,
                HEAD_DIM: tl.constexpr, DP: tl.constexpr, MASKED: tl.constexpr, KV_DESC: tl.constexpr):
    # online softmax of one score tile, then acc += p v
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_ij)
    # ex2.approx.ftz.f32: one MUFU op per score (ex2.approx.f16x2 is split into two MUFU.EX2.F16 by ptxas
    # for sm_90: no gain, checked in the SASS)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_kv(V, DESC_V, start, seq_end, offs_n, h, stride_vn, stride_vh, offs_d, HEAD_DIM, DP, MASKED,
                 KV_DESC)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _vision_attention_kernel(
    Q, K, V, O, POS, FREQ, CU, TILES, DESC_K, DESC_V,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_pn,
    qk_scale, max_tiles, tokens_key, tma_ok,
    HEAD_DIM: tl.constexpr, DP: tl.constexpr, HALF: tl.constexpr, QUARTER: tl.constexpr,
    PAIR_STRIDE: tl.constexpr, ODD_OFF: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_DESC: tl.constexpr,
):
    # KV_DESC: full K / V tiles through the TMA descriptors DESC_K / DESC_V (else plain pointer loads; the
    # descriptors are then unused placeholders). tokens_key and tma_ok: autotuner keys only.
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seg = tl.load(TILES + tile)
    if seg < 0:
        return
    q0 = tl.load(TILES + max_tiles + tile)
    seq_start = tl.load(CU + seg)
    seq_end = tl.load(CU + seg + 1)

    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    offs_i = tl.arange(0, HALF)
    rmask = offs_m < seq_end

    # ---- Q tile (rotated once per program)
    if ROPE:
        freq = tl.load(FREQ + offs_i)
        imask = offs_i < HEAD_DIM // 2
        qp = Q + offs_m[:, None] * stride_qn + h * stride_qh + (offs_i * PAIR_STRIDE)[None, :]
        qmask = rmask[:, None] & imask[None, :]
        qe = tl.load(qp, mask=qmask, other=0.0)
        dtype = qe.dtype
        qo = tl.load(qp + ODD_OFF, mask=qmask, other=0.0)
        qe, qo = _rotate(qe.to(tl.float32), qo.to(tl.float32), POS, offs_m, rmask, stride_pn, freq, offs_i,
                         QUARTER)
        qe = qe.to(dtype)
        qo = qo.to(dtype)
        q = qe  # unused placeholder
    else:
        freq = tl.zeros([HALF], dtype=tl.float32)
        qp = Q + offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :]
        q = tl.load(qp, mask=rmask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        qe = q  # unused placeholders
        qo = q

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    # ---- full key tiles of this image: no masks; then one masked tail tile
    full_end = seq_start + ((seq_end - seq_start) // BLOCK_N) * BLOCK_N
    for start in range(seq_start, full_end, BLOCK_N):
        qk = _scores(q, qe, qo, K, DESC_K, POS, freq, offs_i, offs_d, start, seq_end, offs_n, h, stride_kn,
                     stride_kh, stride_pn, HEAD_DIM, DP, QUARTER, PAIR_STRIDE, ODD_OFF, ROPE, False, KV_DESC)
        acc, l_i, m_i = _softmax_pv(qk, acc, l_i, m_i, V, DESC_V, offs_d, start, seq_end, offs_n, h,
                                    stride_vn, stride_vh, qk_scale, HEAD_DIM, DP, False, KV_DESC)
    if full_end < seq_end:
        qk = _scores(q, qe, qo, K, DESC_K, POS, freq, offs_i, offs_d, full_end, seq_end, offs_n, h, stride_kn,
                     stride_kh, stride_pn, HEAD_DIM, DP, QUARTER, PAIR_STRIDE, ODD_OFF, ROPE, True, False)
        acc, l_i, m_i = _softmax_pv(qk, acc, l_i, m_i, V, DESC_V, offs_d, full_end, seq_end, offs_n, h,
                                    stride_vn, stride_vh, qk_scale, HEAD_DIM, DP, True, False)

    acc = acc / l_i[:, None]
    op = O + offs_m[:, None] * stride_on + h * stride_oh + offs_d[None, :]
    tl.store(op, acc.to(O.dtype.element_ty), mask=rmask[:, None] & (offs_d[None, :] < HEAD_DIM))


def _desc_block_shapes(nargs):
    # autotuner pre-hook of the KV_DESC configs: the descriptors' box is one (BLOCK_N, HEAD_DIM) tile
    for name in ("DESC_K", "DESC_V"):
        nargs[name].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "KV_DESC": False}, num_warps=4, num_stages=1)]
    # Short lists (compile time on the device is scarce), from the H200 sweeps of
    # benchmarks/sweep_vision_attention.py (results/vision_attention_sweep.jsonl), hd 64, 4-image set:
    # - BLOCK_M 128 (8 warps = 2 warpgroups of 64 query rows): BLOCK_N 64 / 3 stages best, 381 TFLOP/s
    #   (126-128 regs, 2 CTAs per SM); TMA loads cost 7% there; 4-warp tiles of 128 rows spill: left out.
    # - BLOCK_M 64 (4 warps, one warpgroup): BLOCK_N 128 with K / V through TMA, 2 stages, registers capped
    #   at 168 (3 CTAs per SM) best, 403 TFLOP/s; more CTAs per SM (BLOCK_N 64, 128 regs, 4 CTAs) 382.
    # The tensor cores and the exp unit (MUFU: one exp per score, as many cycles as the score's MMA share
    # at head_dim 64) stay ~50% busy each in every variant (Nsight Compute): Triton issues them in turn.
    m128 = [triton.Config({"BLOCK_N": bn, "KV_DESC": False}, num_warps=8, num_stages=s)
            for bn, s in ((128, 3), (128, 2), (64, 3), (64, 4), (64, 2))]
    m64 = [triton.Config({"BLOCK_N": 128, "KV_DESC": True}, num_warps=4, num_stages=2, maxnreg=168,
                         pre_hook=_desc_block_shapes),
           triton.Config({"BLOCK_N": 128, "KV_DESC": True}, num_warps=4, num_stages=3, pre_hook=_desc_block_shapes),
           triton.Config({"BLOCK_N": 128, "KV_DESC": False}, num_warps=4, num_stages=2, maxnreg=168),
           triton.Config({"BLOCK_N": 64, "KV_DESC": False}, num_warps=4, num_stages=3, maxnreg=128)]
    return m128 + m64


def _prune(configs, named_args, **kwargs):
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 128))
    dp = kwargs.get("DP", named_args.get("DP", 64))
    tma = bool(named_args.get("tma_ok", 0))
    out = []
    for c in configs:
        bn = c.kwargs["BLOCK_N"]
        if dp >= 128 and bn == 128 and c.num_stages > 2:
            continue  # shared memory
        if (bm <= 64) != (c.num_warps == 4):
            continue  # 8 warps for 128-row tiles, 4 for 64-row tiles
        if c.kwargs["KV_DESC"] and not tma:
            continue
        out.append(c)
    return out or [triton.Config({"BLOCK_N": 64, "KV_DESC": False}, num_warps=4, num_stages=2)]


def _quick_bench(kernel_call, quantiles):
    # the autotuner's timing: 5 ms warm-up + 25 ms of runs per config (Triton's default 25 + 100 ms made
    # tuning the engine's 7 keys take seconds of its load)
    from triton.testing import do_bench
    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# choices are also cached on disk (Triton's cache directory, keyed by kernel source, GPU, key and configs),
# so a second process on the same machine tunes nothing
_vision_attention_tuned = triton.autotune(
    configs=_configs(), key=["tokens_key", "HEAD_DIM", "ROPE", "PAIR_STRIDE", "BLOCK_M", "tma_ok"],
    prune_configs_by={"early_config_prune": _prune}, do_bench=_quick_bench, cache_results=True,
)(_vision_attention_kernel)
_compile_events.register_autotuner(_vision_attention_tuned)     # its cache size = tunings done


# --------------------------------------------------------------------------------------------- launcher
def _check(name, t, n, h, d):
    if t.dim() != 3 or t.shape[0] != n or t.shape[1] != h or t.shape[2] != d:
        raise ValueError(f"{name}: expected shape ({n}, {h}, {d}), got {tuple(t.shape)}")
    if t.stride(2) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (stride {t.stride(2)})")


def tma_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: bool) -> bool:
    """Whether K / V tiles can go through TMA descriptors: a Hopper-or-newer GPU, no in-kernel RoPE (rotated
    keys are computed, not loaded as they are), a power-of-two head_dim (the box is one head), and rows
    that TMA can address (16-byte aligned base and row stride; the heads of a row contiguous)."""
    if _INTERPRET or not q.is_cuda or rope or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    N, H, D = k.shape
    if D != triton.next_power_of_2(D):
        return False
    return all(t.stride(1) == D and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (k, v))


def default_block_m(device, head_dim: int) -> int:
    """Query rows per tile: 64 on Hopper for head_dim 64 (one warpgroup of 4 warps, K / V through TMA: 403
    vs 381 useful TFLOP/s for 128-row tiles on the H200, results/vision_attention_sweep.jsonl); 128 for other
    head dims (Pixtral-Large's 88 is padded to 128: no TMA box, and the 4-warp register caps were tuned for
    64) and other GPUs, where 64 is unmeasured."""
    dev = torch.device(device) if device is not None else None
    if (dev is not None and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] == 9
            and head_dim == 64):
        return 64
    return 128


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """Host-side TMA descriptors of k and v as 2-D (N, H*D) row-strided views, one (block_n, D) box (the
    layout tma_eligible checked)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    N, H, D = k.shape
    return [TensorDescriptor(t, shape=[N, H * D], strides=[t.stride(0), 1], block_shape=[block_n, D])
            for t in (k, v)]


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     plan: VisionAttentionPlan, positions: torch.Tensor | None = None,
                     rope_freqs: torch.Tensor | None = None, rope: bool = True, layout: str = "interleaved",
                     scale: float | None = None, out: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """Block-diagonal attention with fused 2D RoPE (see module docstring).

    q, k, v: (N, H, D) fp16/bf16, last dim contiguous. cu_seqlens: (S+1,) int32 on q's device.
    plan: from plan_vision_attention(seqlens, block_m) (tiles on q's device). positions: (N, 2) int32
    (row, col) and rope_freqs: (next_pow2(D/2),) fp32 from rope_pair_freqs(D, theta), needed if rope.
    layout: "interleaved" (Mistral) or "half" (rotate-half / HF-permuted). out: optional (N, H, D) buffer.
    config: {"BLOCK_N", "num_warps", "num_stages"[, "KV_DESC", "maxnreg"]} to bypass the autotuner (tests,
    benchmarks, interpreter).
    Returns out (N, H, D) in q's dtype; rows of tokens that belong to no tile are not written.
    """
    if q.dim() != 3:
        raise ValueError(f"q: expected (N, H, D), got shape {tuple(q.shape)}")
    N, H, D = q.shape
    _check("k", k, N, H, D)
    _check("v", v, N, H, D)
    _check("q", q, N, H, D)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: dtype {q.dtype} not supported (fp16/bf16; fp32 for interpreter tests)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k/v: dtype must equal q's ({q.dtype}), got {k.dtype}/{v.dtype}")
    if D % 4 != 0 or D > 256:
        raise ValueError(f"head_dim {D}: must be a multiple of 4 and <= 256")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens: expected 1-D int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if plan.tiles.device != q.device or cu_seqlens.device != q.device:
        raise ValueError("plan.tiles / cu_seqlens: must be on q's device (plan once, copy once)")
    if layout not in ("interleaved", "half"):
        raise ValueError(f"layout: 'interleaved' or 'half', got {layout!r}")
    if rope:
        if positions is None or rope_freqs is None:
            raise ValueError("positions and rope_freqs are required when rope=True")
        if positions.shape != (N, 2) or positions.dtype != torch.int32 or positions.stride(1) != 1:
            raise ValueError(f"positions: expected (N={N}, 2) int32 row-contiguous, got "
                             f"{tuple(positions.shape)} {positions.dtype}")
        if rope_freqs.dtype != torch.float32 or rope_freqs.numel() != triton.next_power_of_2(D // 2):
            raise ValueError("rope_freqs: expected rope_pair_freqs(head_dim, theta) (fp32, next_pow2(D/2))")
    if out is None:
        out = torch.empty((N, H, D), device=q.device, dtype=q.dtype)
    elif out.shape != (N, H, D) or out.stride(2) != 1 or out.dtype != q.dtype:
        raise ValueError(f"out: expected ({N}, {H}, {D}) {q.dtype} with contiguous last dim")
    pos = positions if rope else cu_seqlens
    frq = rope_freqs if rope else cu_seqlens
    stride_pn = positions.stride(0) if rope else 0
    scale = D ** -0.5 if scale is None else scale
    half = D // 2
    meta = dict(HEAD_DIM=D, DP=triton.next_power_of_2(D), HALF=triton.next_power_of_2(half), QUARTER=D // 4,
                PAIR_STRIDE=2 if layout == "interleaved" else 1, ODD_OFF=1 if layout == "interleaved" else half,
                ROPE=bool(rope), BLOCK_M=plan.block_m)
    grid = (plan.max_tiles, H)
    tokens_key = attention_tokens_key(N)
    if config is None and _INTERPRET:
        config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    cfg = dict(config) if config is not None else {}
    tma = tma_eligible(q, k, v, rope)
    if cfg.get("KV_DESC") and not tma:
        raise ValueError("KV_DESC: needs a Hopper-or-newer GPU, rope=False, a power-of-two head_dim and k / v "
                         "rows that TMA can address (16-byte aligned base and row stride, heads contiguous)")
    # descriptors where a config may use them (the autotuner's KV_DESC configs set their box in a pre-hook);
    # otherwise k and v themselves stand in for the unused arguments
    use_desc = tma and (config is None or cfg.get("KV_DESC"))
    desc_k, desc_v = _kv_descriptors(k, v, cfg.get("BLOCK_N", 128)) if use_desc else (k, v)
    args = (q, k, v, out, pos, frq, cu_seqlens, plan.tiles, desc_k, desc_v,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), stride_pn, scale * LOG2E, plan.max_tiles, tokens_key, int(tma))
    if config is not None:
        nw, ns = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
        launch = {"maxnreg": cfg.pop("maxnreg")} if "maxnreg" in cfg else {}
        cfg = {"KV_DESC": False, **cfg}
        _vision_attention_kernel[grid](*args, **meta, **cfg, num_warps=nw, num_stages=ns, **launch)
    else:
        _vision_attention_tuned[grid](*args, **meta)
    return out


MAX_TOKENS_KEY = 16384


def attention_tokens_key(n_tokens: int) -> int:
    """The autotuner's size key for a pack of n_tokens rows: next_pow2(n), at most MAX_TOKENS_KEY (past
    that the tiles fill the GPU many times over, and each key would need its own tuning at load)."""
    return min(triton.next_power_of_2(max(n_tokens, 1)), MAX_TOKENS_KEY)


def best_config() -> dict:
    """The autotuner's choices so far, {key: config string} (for benchmark logs)."""
    return {str(k): str(v) for k, v in _vision_attention_tuned.cache.items()}


def warmup_vision_attention(n_heads: int, head_dim: int, token_counts: list[int], dtype=torch.bfloat16,
                            block_m: int | None = None, rope: bool = True, layout: str = "half", device="cuda",
                            max_segment: int | None = None) -> None:
    """Run the autotuner for each token bucket (tokens_key = attention_tokens_key(N)) before any CUDA graph
    capture, on N tokens packed as images of at most max_segment tokens (default: one image of N)."""
    block_m = default_block_m(device, head_dim) if block_m is None else block_m
    for n in token_counts:
        seg = n if max_segment is None else max_segment
        lens = [min(seg, n - a) for a in range(0, n, seg)]
        q = torch.randn(n, n_heads, head_dim, device=device, dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        pos = torch.zeros(n, 2, dtype=torch.int32, device=device)
        plan = plan_vision_attention(lens, block_m, max_tiles_for(n, len(lens), block_m), device=device)
        vision_attention(q, k, v, cu, plan, pos, rope_pair_freqs(head_dim, 10000.0, device), rope=rope,
                         layout=layout)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def useful_flops(seqlens: list[int], n_heads: int, head_dim: int) -> float:
    """4 * H * D * sum(n_i^2): the FLOPs inside the diagonal blocks (QK^T and PV)."""
    return float(sum(4 * n_heads * head_dim * n * n for n in seqlens))


__all__ = ["vision_attention", "tma_eligible", "default_block_m", "plan_vision_attention", "VisionAttentionPlan",
           "rope_pair_freqs", "max_tiles_for", "warmup_vision_attention", "useful_flops", "plan_tiles", "best_config",
           "attention_tokens_key", "MAX_TOKENS_KEY"]
_ = math
