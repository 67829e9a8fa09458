"""Structured output: a per-row token bitmask applied to the logits in place, inside the captured decode step.

    for each row r with masked[r] != 0, each token v < V:
        allowed = (bitmask[r, v >> 5] >> (v & 31)) & 1
        logits[r, v] = logits[r, v] if allowed else -inf

Shapes: logits (B, V) fp32 (row stride may exceed V); bitmask (B, W) int32, W = ceil(V / 32) (the layout
llguidance and xgrammar fill); masked (B,) int32 (0: the row is free and nothing of it is read or written,
so unconstrained sequences in a mixed batch cost nothing but their program launch).
Grid: (B, cdiv(V, BLOCK)). Rows are a batch's slots; a row's mask is uploaded by the host before the step.
As in vLLM, the logprobs a constrained request reports are of the masked distribution (disallowed: -inf).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _token_bitmask_kernel(logits_ptr, mask_ptr, flag_ptr, V, stride_l, stride_m, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(flag_ptr + row) == 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < V
    words = tl.load(mask_ptr + row * stride_m + (offs >> 5), mask=inb, other=0)
    allowed = ((words >> (offs & 31)) & 1) != 0
    tl.store(logits_ptr + row * stride_l + offs, float("-inf"), mask=inb & (allowed == 0))


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """In place: logits (B, V) fp32, bitmask (B, ceil(V/32)) int32, masked (B,) int32 -> logits."""
    B, V = logits.shape
    W = (V + 31) // 32
    if bitmask.shape != (B, W) or bitmask.dtype != torch.int32:
        raise ValueError(f"token_bitmask: bitmask must be ({B}, {W}) int32 for logits {tuple(logits.shape)}, "
                         f"got {tuple(bitmask.shape)} {bitmask.dtype}")
    if masked.shape != (B,) or masked.dtype != torch.int32:
        raise ValueError(f"token_bitmask: masked must be ({B},) int32, got {tuple(masked.shape)} {masked.dtype}")
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("token_bitmask: logits and bitmask rows must be contiguous")
    if B:
        _token_bitmask_kernel[(B, triton.cdiv(V, BLOCK))](logits, bitmask, masked, V, logits.stride(0),
                                                          bitmask.stride(0), BLOCK=BLOCK)
    return logits


def apply_token_bitmask_torch_(logits: torch.Tensor, bitmask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The same in plain PyTorch (the CPU engine; the reference the kernel is tested against)."""
    V = logits.shape[-1]
    v = torch.arange(V, device=logits.device)
    allowed = ((bitmask[:, v >> 5] >> (v & 31)) & 1).bool()                   # (B, V)
    logits.masked_fill_(~allowed & (masked != 0)[:, None], float("-inf"))
    return logits
