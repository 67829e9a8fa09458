"""Token sampling on the device with no host synchronisation, capturable in a CUDA graph.

All per-sequence settings live in device tensors (SamplingState), so one captured graph serves every
request: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), a seed, and for structured output a
token bitmask per slot (kernels/token_bitmask.py), filled by the host before each step of a constrained
sequence and applied to its logits first; rows whose `masked` flag is 0 are untouched. Then the sampling
controls (logit_bias, min_tokens, repetition / frequency / presence penalties; pixtral_rt/sampling_controls.py,
kernels/logits_process.py), out of place, on the rows whose `ctl` flag is set; they are written at slot
set-up, and each controlled row's output-token counts are updated inside the step (count_tokens_).

Sampling uses the exponential-race form of the Gumbel trick:
    token = argmax_i  p_i / E_i,   E_i = -log(u_i) ~ Exp(1)
which draws token i with probability p_i. The uniforms u come from a counter-based integer hash of
(seed, step, vocab index) computed on the device: reproducible for a seed, independent of the batch
and of graph capture, and with no generator state to register with the graph.

Shapes: logits (B, V) fp32; every state tensor (B,) but bitmask (B, ceil(V / 32)) int32 and the controls'
per-slot tables (counts (S, V), prompt_bits / sparse_bits (S, ceil(V / 32)), sparse_* (S, SPARSE)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .sampling_controls import SPARSE, apply_controls

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


MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64
assert MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + 1 <= SPARSE     # bias ids + (EOS + stop ids) banned by min_tokens


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
    # sampling controls, vLLM's semantics (kernels/logits_process.py has the formula)
    presence_penalty: float = 0.0    # [-2, 2], on output tokens: - p if the token was generated
    frequency_penalty: float = 0.0   # [-2, 2], on output tokens: - f * times generated
    repetition_penalty: float = 1.0  # > 0 (1 = off), on prompt + output tokens: logit / r if > 0, else * r
    logit_bias: dict = field(default_factory=dict)   # token id -> [-100, 100] added to its logit; <= 300
    min_tokens: int = 0              # EOS and stop_token_ids are banned until this many output tokens
    stop_token_ids: tuple[int, ...] = ()   # finish "stop" when one is sampled (not emitted); <= 64

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self.logit_bias = dict(self.logit_bias)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        for t, b in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias: {t!r} is not a token id (an integer >= 0)")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias[{t}] must be in [-100, 100], got {b}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
        for i, t in enumerate(self.stop_token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids[{i}]: {t!r} is not a token id (an integer >= 0)")

    def check_vocab(self, vocab: int) -> None:
        """ValueError naming the first token id (logit_bias, stop_token_ids) outside 0..vocab-1."""
        for t in self.logit_bias:
            if t >= vocab:
                raise ValueError(f"logit_bias: token id {t} is outside the vocabulary (0..{vocab - 1})")
        for i, t in enumerate(self.stop_token_ids):
            if t >= vocab:
                raise ValueError(f"stop_token_ids[{i}]: token id {t} is outside the vocabulary (0..{vocab - 1})")

    @property
    def has_controls(self) -> bool:
        """True when the logits of this request need the controls pass (a stop_token_ids list alone does
        not: it is checked on the host as tokens are delivered)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias) or self.min_tokens > 0)

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
        self._last: dict[int, tuple] = {}    # slot -> (temperature, top_p, top_k, seed) set() wrote there
        self.bitmask = torch.zeros(batch, (vocab + 31) // 32, device=device, dtype=torch.int32)
        self.masked = torch.zeros(batch, device=device, dtype=torch.int32)   # 1: apply the row's bitmask
        # sampling controls (written by sampling_controls.write_controls_ at slot set-up; formula and shapes:
        # kernels/logits_process.py). Per slot, 4 * (V + 2 * ceil(V / 32) + 3 * SPARSE + 7) bytes: 549 KiB at
        # V = 131072, almost all of it the output-token counts
        i32 = dict(device=device, dtype=torch.int32)
        self.slots = torch.arange(batch, **i32)                # row -> slot (identity over the whole state)
        self.ctl = torch.zeros(batch, **i32)                   # 1: the row has controls (else untouched)
        self.min_tokens = torch.zeros(batch, device=device, dtype=torch.int64)
        self.repetition = torch.ones(batch, device=device, dtype=torch.float32)
        self.frequency = torch.zeros(batch, device=device, dtype=torch.float32)
        self.presence = torch.zeros(batch, device=device, dtype=torch.float32)
        self.n_sparse = torch.zeros(batch, **i32)
        self.counts = torch.zeros(batch, vocab, **i32)         # output tokens so far, per id (controlled slots)
        self.prompt_bits = torch.zeros(batch, (vocab + 31) // 32, **i32)
        self.sparse_bits = torch.zeros(batch, (vocab + 31) // 32, **i32)
        self.sparse_ids = torch.zeros(batch, SPARSE, **i32)
        self.sparse_bias = torch.zeros(batch, SPARSE, device=device, dtype=torch.float32)
        self.sparse_ban = torch.zeros(batch, SPARSE, **i32)

    # per-row settings (a view or a copy in a state over some slots) and per-slot tables (always whole,
    # addressed through `slots`)
    PER_ROW = ("temperature", "top_p", "top_k", "seed", "step", "bitmask", "masked", "slots", "ctl", "min_tokens",
               "repetition", "frequency", "presence", "n_sparse")
    TABLES = ("counts", "prompt_bits", "sparse_bits", "sparse_ids", "sparse_bias", "sparse_ban")

    def rows(self, idx: torch.Tensor | slice) -> "SamplingState":
        """The state over some slots: per-row settings a view for a slice (in-place updates land here), a copy
        for an index tensor, gathered when first read (a greedy prefill's first token reads 3 of the 14: the
        other gathers would be launches on the request's path); the per-slot tables shared."""
        if not isinstance(idx, slice):
            return _GatheredRows(self, idx)
        out = SamplingState.__new__(SamplingState)
        for name in self.PER_ROW:
            setattr(out, name, getattr(self, name)[idx])
        for name in self.TABLES:
            setattr(out, name, getattr(self, name))
        return out

    def set(self, slot: int, p: SamplingParams) -> None:
        """A request's settings into its slot. temperature / top_p / top_k / seed are written only where they
        change (each write is a launch on the request's path; only set() writes them, so the host copy of
        the last values is exact); step and ctl always."""
        # fill_ on a one-element view: `t[slot] = x` copies a host scalar tensor to the device, a blocking
        # copy that synchronises the stream (profile_ttft --sync-debug found these on the TTFT path)
        vals = (p.temperature, p.top_p, p.top_k, p.seed)
        last = self._last                    # (the full state's; rows() views are never set())
        if last.get(slot) != vals:
            self.temperature[slot].fill_(p.temperature)
            self.top_p[slot].fill_(p.top_p)
            self.top_k[slot].fill_(p.top_k)
            self.seed[slot].fill_(p.seed)
            last[slot] = vals
        self.step[slot].fill_(0)      # masked: rewritten whole before each step (ModelRunner.set_token_masks)
        self.ctl[slot].fill_(0)       # controls: sampling_controls.write_controls_ after this, if any


class _GatheredRows(SamplingState):
    """SamplingState.rows(index tensor): each per-row setting gathered from the full state on its first read
    (then an attribute like any other: assigned or updated in place, it no longer reads the full state)."""

    def __init__(self, full: SamplingState, idx: torch.Tensor):
        self._full, self._idx = full, idx
        for name in self.TABLES:
            setattr(self, name, getattr(full, name))

    def __getattr__(self, name: str):          # only for attributes not set yet
        if name in SamplingState.PER_ROW:
            val = getattr(self._full, name)[self._idx]
            setattr(self, name, val)
            return val
        raise AttributeError(name)


def apply_token_bitmask_(logits: torch.Tensor, st: SamplingState) -> torch.Tensor:
    """In place on logits (B, V) fp32: -inf for the tokens a masked row's bitmask disallows."""
    if st.bitmask.shape[-1] == 0:                # a state built without a vocab: nothing can be masked
        return logits
    if logits.is_cuda:
        from .kernels.token_bitmask import apply_token_bitmask_ as kernel
    else:
        from .kernels.token_bitmask import apply_token_bitmask_torch_ as kernel
    return kernel(logits, st.bitmask, st.masked)


def sample(logits: torch.Tensor, st: SamplingState, greedy_only: bool = False, controls: bool = False
           ) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64; advances st.step. No host sync.
    greedy_only: skip the sort entirely (a separate, cheaper graph for greedy requests).
    controls: apply the sampling controls of the rows whose ctl is set (a graph of its own for batches
    with such rows; without them, nothing of the controls runs). The input logits are not modified by it:
    they stay the raw distribution the logprobs are taken from (after a structured-output mask)."""
    logits = apply_token_bitmask_(logits.float(), st)
    if controls:
        logits = apply_controls(logits, st)
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
    # u reaches 1.0 in float32 ((2^24 - 0.5) / 2^24 rounds up), so E = -log(u) can be 0: the clamp keeps a
    # zero-probability token (masked, or cut by top-k / top-p) at 0 instead of 0/0 = NaN, which argmax would
    # pick (~V / 2^24 per step: 0.8% of steps at V = 131072)
    choice = (probs / (-torch.log(u)).clamp_min(1e-30)).argmax(-1, keepdim=True)  # (B, 1) index into sorted order
    sampled = order.gather(1, choice)[:, 0]
    st.step += 1
    return torch.where(st.temperature > 0, sampled, greedy_tok)
