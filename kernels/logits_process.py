"""Sampling controls: logit bias, min_tokens, repetition / frequency / presence penalties, per row, written
OUT OF PLACE (the model's logits stay intact: the logprobs users get are of the raw distribution, as vLLM's
default `raw_logprobs`), inside the captured decode step. In vLLM's order (v1 sampler: min_tokens and
logit_bias, then the penalties):

    for each row r with ctl[r] != 0 (slot s = slots[r]), each token v < V:
        x    = logits[r, v] + bias(s, v)                      # logit_bias, sparse: 0 off the list
        seen = prompt(s, v) or count[s, v] > 0                # in the prompt or already generated
        x    = (x / rep[r] if x > 0 else x * rep[r]) if seen else x           # repetition_penalty
        x    = x - freq[r] * count[s, v] - pres[r] * (count[s, v] > 0)        # frequency / presence
        x    = -inf if banned(s, v) and step[r] < min_tokens[r] else x        # min_tokens: no EOS / stop id
        out[r, v] = x
    rows with ctl[r] == 0: nothing of them is read or written (the caller takes their logits as they are).

Shapes (B rows of this call, S slots of the state, V vocab, W = ceil(V / 32), K sparse entries per slot):
    logits, out (B, V) fp32 (row strides free, last dim contiguous)
    per row (B,):  slots int32, ctl int32, step int64, min_tokens int64, rep / freq / pres fp32, n_sparse int32
    per slot:      counts (S, V) int32 (output tokens so far), prompt_bits (S, W) int32 (bit v & 31 of word
                   v >> 5: v is in the prompt), sparse_bits (S, W) int32 (v has a sparse entry), sparse_ids
                   (S, K) int32, sparse_bias (S, K) fp32, sparse_ban (S, K) int32 (1: EOS / a stop id, banned
                   while step < min_tokens); entries 0..n_sparse-1 are used, one per distinct id
Grid (B, NB + 1), NB = cdiv(V, BLOCK): programs 0..NB-1 of a row are its dense blocks, which skip the ids
with a sparse entry; program NB recomputes exactly those ids (bias, ban) from the raw logits. The two never
write the same element, so no ordering between programs is needed. Work of a controlled row: read logits +
counts (8 B per token) + 2 bit words per 32 tokens, write out (4 B); a row with ctl 0 costs its programs'
launch and one load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
SPARSE_LANES = 512            # >= K (power of two: the sparse program's lanes)


@triton.jit
def _penalise(x, cnt, seen, rep, freq, pres):
    x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
    return x - freq * cnt.to(tl.float32) - pres * (cnt > 0).to(tl.float32)


@triton.jit
def _logits_process_kernel(logits_ptr, out_ptr, slots_ptr, ctl_ptr, step_ptr, min_tokens_ptr, rep_ptr, freq_ptr,
                           pres_ptr, n_sparse_ptr, counts_ptr, prompt_bits_ptr, sparse_bits_ptr, sparse_ids_ptr,
                           sparse_bias_ptr, sparse_ban_ptr, V, stride_l, stride_o, stride_c, stride_w, stride_k,
                           BLOCK: tl.constexpr, LANES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(ctl_ptr + row) == 0:
        return
    slot = tl.load(slots_ptr + row).to(tl.int64)
    rep, freq, pres = tl.load(rep_ptr + row), tl.load(freq_ptr + row), tl.load(pres_ptr + row)
    blk = tl.program_id(1)
    # each branch in a function of its own: Triton types a name assigned in both branches of an `if` as one
    # value, and the dense block (BLOCK,) and the sparse lanes (LANES,) have different shapes
    if blk < tl.num_programs(1) - 1:                 # a dense block of the row
        _dense_block(logits_ptr, out_ptr, counts_ptr, prompt_bits_ptr, sparse_bits_ptr, row, slot, blk, V,
                     stride_l, stride_o, stride_c, stride_w, rep, freq, pres, BLOCK)
    else:                                            # the row's sparse ids: bias and the min_tokens ban
        _sparse_lanes(logits_ptr, out_ptr, step_ptr, min_tokens_ptr, n_sparse_ptr, counts_ptr, prompt_bits_ptr,
                      sparse_ids_ptr, sparse_bias_ptr, sparse_ban_ptr, row, slot, stride_l, stride_o, stride_c,
                      stride_w, stride_k, rep, freq, pres, LANES)


@triton.jit
def _dense_block(logits_ptr, out_ptr, counts_ptr, prompt_bits_ptr, sparse_bits_ptr, row, slot, blk, V,
                 stride_l, stride_o, stride_c, stride_w, rep, freq, pres, BLOCK: tl.constexpr):
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < V
    x = tl.load(logits_ptr + row * stride_l + offs, mask=inb, other=0.0)
    cnt = tl.load(counts_ptr + slot * stride_c + offs, mask=inb, other=0)
    pw = tl.load(prompt_bits_ptr + slot * stride_w + (offs >> 5), mask=inb, other=0)
    sw = tl.load(sparse_bits_ptr + slot * stride_w + (offs >> 5), mask=inb, other=0)
    seen = (((pw >> (offs & 31)) & 1) != 0) | (cnt > 0)
    y = _penalise(x, cnt, seen, rep, freq, pres)
    tl.store(out_ptr + row * stride_o + offs, y, mask=inb & (((sw >> (offs & 31)) & 1) == 0))


@triton.jit
def _sparse_lanes(logits_ptr, out_ptr, step_ptr, min_tokens_ptr, n_sparse_ptr, counts_ptr, prompt_bits_ptr,
                  sparse_ids_ptr, sparse_bias_ptr, sparse_ban_ptr, row, slot, stride_l, stride_o, stride_c,
                  stride_w, stride_k, rep, freq, pres, LANES: tl.constexpr):
    k = tl.arange(0, LANES)
    used = k < tl.load(n_sparse_ptr + row)
    ids = tl.load(sparse_ids_ptr + slot * stride_k + k, mask=used, other=0).to(tl.int64)
    x = tl.load(logits_ptr + row * stride_l + ids, mask=used, other=0.0)
    x += tl.load(sparse_bias_ptr + slot * stride_k + k, mask=used, other=0.0)
    cnt = tl.load(counts_ptr + slot * stride_c + ids, mask=used, other=0)
    pw = tl.load(prompt_bits_ptr + slot * stride_w + (ids >> 5), mask=used, other=0)
    seen = (((pw >> (ids & 31)) & 1) != 0) | (cnt > 0)
    y = _penalise(x, cnt, seen, rep, freq, pres)
    banned = tl.load(sparse_ban_ptr + slot * stride_k + k, mask=used, other=0) != 0
    banned = banned & (tl.load(step_ptr + row) < tl.load(min_tokens_ptr + row))
    tl.store(out_ptr + row * stride_o + ids, tl.where(banned, float("-inf"), y), mask=used)


_ROW = {"slots": torch.int32, "ctl": torch.int32, "step": torch.int64, "min_tokens": torch.int64,
        "repetition": torch.float32, "frequency": torch.float32, "presence": torch.float32, "n_sparse": torch.int32}
_SLOT = {"counts": (torch.int32, "V"), "prompt_bits": (torch.int32, "W"), "sparse_bits": (torch.int32, "W"),
         "sparse_ids": (torch.int32, "K"), "sparse_bias": (torch.float32, "K"), "sparse_ban": (torch.int32, "K")}


def _check(logits: torch.Tensor, out: torch.Tensor, t: dict) -> tuple[int, int, int]:
    """Every shape, dtype and stride the kernel relies on, named in the error. Returns (B, V, K)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or out.shape != logits.shape or out.dtype != torch.float32:
        raise ValueError(f"logits_process: logits and out must be (B, V) fp32, got {tuple(logits.shape)} "
                         f"{logits.dtype} and {tuple(out.shape)} {out.dtype}")
    if logits.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("logits_process: logits and out rows must be contiguous")
    B, V = logits.shape
    S, K = t["sparse_ids"].shape
    if K > SPARSE_LANES:
        raise ValueError(f"logits_process: {K} sparse entries per slot, at most {SPARSE_LANES}")
    for name, dtype in _ROW.items():
        if t[name].shape != (B,) or t[name].dtype != dtype:
            raise ValueError(f"logits_process: {name} must be ({B},) {dtype}, got {tuple(t[name].shape)} "
                             f"{t[name].dtype}")
    want = {"V": V, "W": (V + 31) // 32, "K": K}
    for name, (dtype, width) in _SLOT.items():
        x = t[name]
        if x.shape != (S, want[width]) or x.dtype != dtype or x.stride(-1) != 1:
            raise ValueError(f"logits_process: {name} must be ({S}, {want[width]}) {dtype} with contiguous rows, "
                             f"got {tuple(x.shape)} {x.dtype}")
    if t["prompt_bits"].stride(0) != t["sparse_bits"].stride(0) or t["sparse_ids"].stride(0) != \
            t["sparse_bias"].stride(0) or t["sparse_ids"].stride(0) != t["sparse_ban"].stride(0):
        raise ValueError("logits_process: the bit tables, and the sparse tables, must share their row strides")
    return B, V, K


def logits_process(logits: torch.Tensor, out: torch.Tensor, **t: torch.Tensor) -> torch.Tensor:
    """out[r] = the controlled logits of row r for every row with ctl[r] != 0 (formula above); other rows of
    `out` are not written. Keyword tensors: the per-row and per-slot tensors of the docstring. Returns out."""
    B, V, _ = _check(logits, out, t)
    if B:
        grid = (B, triton.cdiv(V, BLOCK) + 1)
        _logits_process_kernel[grid](
            logits, out, t["slots"], t["ctl"], t["step"], t["min_tokens"], t["repetition"], t["frequency"],
            t["presence"], t["n_sparse"], t["counts"], t["prompt_bits"], t["sparse_bits"], t["sparse_ids"],
            t["sparse_bias"], t["sparse_ban"], V, logits.stride(0), out.stride(0), t["counts"].stride(0),
            t["prompt_bits"].stride(0), t["sparse_ids"].stride(0), BLOCK=BLOCK, LANES=SPARSE_LANES)
    return out


def logits_process_torch(logits: torch.Tensor, out: torch.Tensor, **t: torch.Tensor) -> torch.Tensor:
    """The same in plain PyTorch, vectorised over the rows (the CPU engine's path). Rows with ctl 0 of `out`
    keep what they held."""
    B, V, K = _check(logits, out, t)
    s = t["slots"].long()
    v = torch.arange(V, device=logits.device)
    cnt = t["counts"][s]                                                     # (B, V)
    seen = (((t["prompt_bits"][s][:, v >> 5] >> (v & 31)) & 1) != 0) | (cnt > 0)
    used = torch.arange(K, device=logits.device)[None, :] < t["n_sparse"][:, None]   # (B, K)
    ids = torch.where(used, t["sparse_ids"][s].long(), 0)
    bias = torch.zeros(B, V, device=logits.device).scatter_add_(1, ids, torch.where(used, t["sparse_bias"][s], 0.0))
    ban = torch.zeros(B, V, dtype=torch.int32, device=logits.device).scatter_add_(
        1, ids, (used & (t["sparse_ban"][s] != 0)).int()) > 0
    x = logits + bias
    rep = t["repetition"][:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - t["frequency"][:, None] * cnt.float() - t["presence"][:, None] * (cnt > 0).float()
    x = torch.where(ban & (t["step"] < t["min_tokens"])[:, None], float("-inf"), x)
    out.copy_(torch.where((t["ctl"] != 0)[:, None], x, out))
    return out
