"""Token sampling on the device with no host synchronisation, capturable in a CUDA graph.

All per-sequence settings live in device tensors (SamplingState), so one captured graph serves every
request: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), a seed, and for structured output a
token bitmask per slot (kernels/token_bitmask.py), filled by the host before each step of a constrained
sequence and applied to its logits first; rows whose `masked` flag is 0 are untouched.

Sampling uses the exponential-race form of the Gumbel trick:
    token = argmax_i  p_i / E_i,   E_i = -log(u_i) ~ Exp(1)
which draws token i with probability p_i. The uniforms u come from a counter-based integer hash of
(seed, step, vocab index) computed on the device: reproducible for a seed, independent of the batch
and of graph capture, and with no generator state to register with the graph.

Shapes: logits (B, V) fp32; every state tensor (B,) but bitmask (B, ceil(V / 32)) int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32 by Chris Wellons) on int64 tensors holding values < 2^32.
    Products stay below 2^63, so int64 arithmetic never overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """seed, step (B,) int64 -> (B, V) fp32 uniforms in (0, 1), a pure function of (seed, step, index)."""
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    s = _hash32((seed[:, None] & _MASK32) ^ 0x5BD1E995)
    t = _hash32((step[:, None] & _MASK32) ^ s)
    h = _hash32(idx ^ t)
    h = _hash32(h ^ s)
    # 24 high-quality bits -> (0, 1): (h + 0.5) / 2^24
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingParams:
    """Host-side settings of one request (validated here, with messages naming the bad value)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    constraint: object = None        # structured output / tool calls (pixtral_rt/structured): None = free

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingState:
    """Per-slot sampling settings as device tensors, written in place (graph-safe)."""

    def __init__(self, batch: int, device, vocab: int = 0):
        self.temperature = torch.zeros(batch, device=device, dtype=torch.float32)
        self.top_p = torch.ones(batch, device=device, dtype=torch.float32)
        self.top_k = torch.zeros(batch, device=device, dtype=torch.int64)
        self.seed = torch.zeros(batch, device=device, dtype=torch.int64)
        self.step = torch.zeros(batch, device=device, dtype=torch.int64)
        self.bitmask = torch.zeros(batch, (vocab + 31) // 32, device=device, dtype=torch.int32)
        self.masked = torch.zeros(batch, device=device, dtype=torch.int32)   # 1: apply the row's bitmask

    def set(self, slot: int, p: SamplingParams) -> None:
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = p.top_k
        self.seed[slot] = p.seed
        self.step[slot] = 0           # masked: rewritten whole before each step (ModelRunner.set_token_masks)


def apply_token_bitmask_(logits: torch.Tensor, st: SamplingState) -> torch.Tensor:
    """In place on logits (B, V) fp32: -inf for the tokens a masked row's bitmask disallows."""
    if st.bitmask.shape[-1] == 0:                # a state built without a vocab: nothing can be masked
        return logits
    if logits.is_cuda:
        from .kernels.token_bitmask import apply_token_bitmask_ as kernel
    else:
        from .kernels.token_bitmask import apply_token_bitmask_torch_ as kernel
    return kernel(logits, st.bitmask, st.masked)


def sample(logits: torch.Tensor, st: SamplingState, greedy_only: bool = False) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64; advances st.step. No host sync.
    greedy_only: skip the sort entirely (a separate, cheaper graph for greedy requests)."""
    logits = apply_token_bitmask_(logits.float(), st)
    greedy_tok = logits.argmax(-1)
    if greedy_only:
        st.step += 1
        return greedy_tok
    B, V = logits.shape
    temp = st.temperature.clamp_min(1e-5)[:, None]
    sorted_logits, order = torch.sort(logits / temp, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, V))[:, None]
    cum_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    keep = (rank < k) & (cum_before < st.top_p[:, None])  # rank 0 is always kept
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    # noise indexed by the ORIGINAL vocab id, so the draw does not depend on ties in the sort
    u = uniform_noise(st.seed, st.step, V).gather(1, order)
    choice = (probs / -torch.log(u)).argmax(-1, keepdim=True)  # (B, 1) index into sorted order
    sampled = order.gather(1, choice)[:, 0]
    st.step += 1
    return torch.where(st.temperature > 0, sampled, greedy_tok)
