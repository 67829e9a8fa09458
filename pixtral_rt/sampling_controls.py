"""Sampling controls per sequence (logit_bias, min_tokens, repetition / frequency / presence penalties): the
host planning of a slot's rows, their write into the SamplingState (pixtral_rt/sampling.py), the logits
pass inside the captured step (kernels/logits_process.py on a GPU, its plain-PyTorch twin on CPU), and the
output-token counts updated after each sampling.

Life of a controlled slot:
    rows = plan_controls(params, prompt, output, eos_id, vocab)    # host, at slot set-up (numpy)
    write_controls_(st, slot, rows, upload)                        # a few device copies; counts rebuilt
    ... each step: sample(..., controls=True) -> apply_controls;  count_tokens_(st, tokens, active)
A resume after preemption rebuilds the same state from the prompt and the delivered output, so the
penalties see exactly the tokens they would have seen without the pause (`output` here, `step` of the
sampler for min_tokens). A slot without controls only gets ctl = 0 (SamplingState.set): nothing else is
written, and its rows are never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPARSE = 365                 # sparse entries per slot: 300 logit_bias ids + EOS + 64 stop ids (min_tokens)


def _bits(ids, vocab: int) -> np.ndarray:
    """(ceil(vocab / 32),) int32 words with bit v & 31 of word v >> 5 set for each id v (llguidance's layout,
    as the token bitmask)."""
    W = (vocab + 31) // 32
    flags = np.zeros(W * 32, dtype=np.uint8)
    flags[np.asarray(ids, dtype=np.int64)] = 1
    return np.packbits(flags.reshape(W, 32), axis=1, bitorder="little").view("<u4")[:, 0].view(np.int32)


@dataclass
class ControlRows:
    """One slot's control settings on the host, laid out for two uploads (ints, floats) plus the output
    tokens delivered so far (the counts of a resumed sequence)."""
    ints: np.ndarray        # int32: ctl, n_sparse, min_tokens, prompt_bits (W), sparse_bits (W), ids (K), ban (K)
    floats: np.ndarray      # fp32: repetition, frequency, presence, bias (K)
    output: np.ndarray      # int64: the sequence's delivered output tokens


def plan_controls(p, prompt, output, eos_id: int, vocab: int) -> ControlRows:
    """The rows of a slot for SamplingParams `p` (has_controls), prompt token ids and delivered output ids.
    Sparse entries: one per distinct id, its logit_bias (0 if none) and whether min_tokens bans it (EOS and
    the stop_token_ids, only when min_tokens > 0)."""
    bias = {int(t): float(b) for t, b in p.logit_bias.items()}
    ban = set()
    if p.min_tokens > 0:
        ban = {int(eos_id), *map(int, p.stop_token_ids)}
    ids = sorted(set(bias) | ban)
    if len(ids) > SPARSE:
        raise ValueError(f"{len(ids)} logit_bias and banned ids; at most {SPARSE}")
    K, W = SPARSE, (vocab + 31) // 32
    ints = np.zeros(3 + 2 * W + 2 * K, dtype=np.int32)
    ints[:3] = (1, len(ids), p.min_tokens)
    if p.repetition_penalty != 1 and len(prompt):        # the prompt matters to the repetition penalty only
        ints[3:3 + W] = _bits(prompt, vocab)
    if ids:
        ints[3 + W:3 + 2 * W] = _bits(ids, vocab)
    ints[3 + 2 * W:3 + 2 * W + len(ids)] = ids
    ints[3 + 2 * W + K:3 + 2 * W + K + len(ids)] = [t in ban for t in ids]
    floats = np.zeros(3 + K, dtype=np.float32)
    floats[:3] = (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
    floats[3:3 + len(ids)] = [bias.get(t, 0.0) for t in ids]
    return ControlRows(ints, floats, np.asarray(output, dtype=np.int64))


def _to_device(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]


def write_controls_(st, slot: int, rows: ControlRows, upload=None) -> None:
    """Write a slot's rows into SamplingState `st` (in place, stream-ordered; no host sync when `upload`
    copies from pinned memory without blocking, as the model runner's does). upload(list of numpy arrays)
    -> device tensors; default: plain copies."""
    ints, floats, output = (upload or (lambda a: _to_device(a, st.ctl.device)))([rows.ints, rows.floats, rows.output])
    W, K = st.prompt_bits.shape[1], st.sparse_ids.shape[1]
    st.ctl[slot:slot + 1].copy_(ints[0:1])
    st.n_sparse[slot:slot + 1].copy_(ints[1:2])
    st.min_tokens[slot:slot + 1].copy_(ints[2:3])
    st.prompt_bits[slot].copy_(ints[3:3 + W])
    st.sparse_bits[slot].copy_(ints[3 + W:3 + 2 * W])
    st.sparse_ids[slot].copy_(ints[3 + 2 * W:3 + 2 * W + K])
    st.sparse_ban[slot].copy_(ints[3 + 2 * W + K:])
    st.repetition[slot:slot + 1].copy_(floats[0:1])
    st.frequency[slot:slot + 1].copy_(floats[1:2])
    st.presence[slot:slot + 1].copy_(floats[2:3])
    st.sparse_bias[slot].copy_(floats[3:])
    st.counts[slot].zero_()
    if len(rows.output):                                       # a resumed sequence: what it had generated
        st.counts[slot].index_add_(0, output, torch.ones_like(output, dtype=torch.int32))


def control_tables(st) -> dict:
    """The keyword tensors of kernels/logits_process.py for SamplingState (or a state over some rows) `st`."""
    return dict(slots=st.slots, ctl=st.ctl, step=st.step, min_tokens=st.min_tokens, repetition=st.repetition,
                frequency=st.frequency, presence=st.presence, n_sparse=st.n_sparse, counts=st.counts,
                prompt_bits=st.prompt_bits, sparse_bits=st.sparse_bits, sparse_ids=st.sparse_ids,
                sparse_bias=st.sparse_bias, sparse_ban=st.sparse_ban)


def apply_controls(logits: torch.Tensor, st) -> torch.Tensor:
    """logits (B, V) fp32 -> (B, V): the controlled logits of the rows whose ctl is set, `logits` itself for
    the others. Out of place (logits is not modified); no host sync, capturable."""
    from .kernels.logits_process import logits_process, logits_process_torch
    out = torch.empty_like(logits)
    (logits_process if logits.is_cuda else logits_process_torch)(logits, out, **control_tables(st))
    return torch.where((st.ctl != 0)[:, None], out, logits)


def count_tokens_(st, tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """After sampling: counts[slot, token] += 1 for each controlled row (and active, when given: a decode
    row with nothing to decode samples garbage). tokens (B,) int64. In place, no host sync, capturable."""
    inc = (st.ctl != 0) if active is None else (st.ctl != 0) & (active > 0)
    V = st.counts.shape[1]
    st.counts.view(-1).index_add_(0, st.slots.long() * V + tokens, inc.to(torch.int32))
