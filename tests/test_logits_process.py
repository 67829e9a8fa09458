"""kernels/logits_process.py (the sampling controls' logits pass) and its plain-PyTorch twin against a plain
per-row reference written from the formula (dicts and loops, no state layout): fresh random logits, awkward
vocab sizes (a partial last bit word, a partial last block), rows that map to other slots, rows with and
without controls mixed, every control alone and together, min_tokens before and after its step, and an out
buffer poisoned with NaN (controlled rows must be written whole, the others not touched). On CPU the kernel
runs in Triton's interpreter (conftest), fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixtral_rt.kernels.logits_process import logits_process, logits_process_torch
from pixtral_rt.sampling import SamplingParams, SamplingState, sample
from pixtral_rt.sampling_controls import (apply_controls, control_tables, count_tokens_, plan_controls,
                                         write_controls_)

EOS = 2


def reference_row(x: torch.Tensor, p: SamplingParams, prompt, output, step: int, eos: int = EOS) -> torch.Tensor:
    """One row, straight from the formula (vLLM's order: logit_bias, min_tokens, then the penalties)."""
    x = x.clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    cnt = torch.zeros_like(x)
    for t in output:
        cnt[t] += 1
    seen = cnt > 0
    seen[list(prompt)] = True
    r = p.repetition_penalty
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    x = x - p.frequency_penalty * cnt - p.presence_penalty * (cnt > 0).float()
    if step < p.min_tokens:
        x[[eos, *p.stop_token_ids]] = float("-inf")
    return x


def _params(g: np.random.Generator, V: int, kind: str) -> SamplingParams | None:
    if kind == "none":
        return None
    ids = lambda n: [int(t) for t in g.choice(V, size=min(n, V), replace=False)]   # noqa: E731
    kw = {}
    if kind in ("bias", "all"):
        kw["logit_bias"] = {t: float(g.uniform(-100, 100)) for t in ids(int(g.integers(1, 40)))}
    if kind in ("penalties", "all"):
        kw.update(repetition_penalty=float(g.uniform(0.5, 2.0)), frequency_penalty=float(g.uniform(-2, 2)),
                  presence_penalty=float(g.uniform(-2, 2)))
    if kind == "repetition":
        kw["repetition_penalty"] = 1.7
    if kind in ("min_tokens", "all"):
        kw.update(min_tokens=int(g.integers(1, 6)), stop_token_ids=tuple(ids(3)))
    if kind == "max":                                       # every sparse entry in use
        kw.update(logit_bias={t: 3.0 for t in ids(300)}, min_tokens=2, stop_token_ids=tuple(ids(64)))
    return SamplingParams(max_tokens=64, **kw)


KINDS = ["none", "bias", "penalties", "repetition", "min_tokens", "all", "none", "all"]


def _case(B: int, V: int, S: int, seed: int, device: str, kinds=KINDS):
    """A state over S slots with row r of the call on slot slots[r] (a permutation, not the identity)."""
    g = np.random.default_rng(seed)
    st = SamplingState(S, device, V)
    slots = g.permutation(S)[:B]
    rows = []
    for r in range(B):
        kind = kinds[(r + seed) % len(kinds)]
        p = _params(g, V, kind)
        prompt = [int(t) for t in g.integers(0, V, size=int(g.integers(1, 30)))]
        output = [int(t) for t in g.integers(0, V, size=int(g.integers(0, 12)))]
        output += output[:3]                                # repeats: counts above 1
        step = int(g.integers(0, 8))
        if p is not None:
            write_controls_(st, int(slots[r]), plan_controls(p, prompt, output, EOS, V))
        rows.append((p, prompt, output, step))
    sub = st.rows(torch.as_tensor(slots, device=device))
    sub.step = torch.tensor([s for *_, s in rows], device=device)
    logits = torch.from_numpy(g.standard_normal((B, V)).astype(np.float32) * 5).to(device)
    logits[0, : min(V, 7)] = 0.0                            # exact zeros: the repetition branch on x > 0
    return st, sub, logits, rows


@pytest.mark.parametrize("B,V,S", [(1, 32, 1), (8, 1001, 11), (5, 4096 + 77, 6), (7, 33, 9), (3, 8192, 4)])
@pytest.mark.parametrize("fn", [logits_process, logits_process_torch], ids=["kernel", "torch"])
def test_logits_process_matches_the_reference(device, fn, B, V, S):
    for seed in range(3):
        st, sub, logits, rows = _case(B, V, S, seed + B + V, device)
        raw = logits.clone()
        out = torch.full_like(logits, float("nan"))
        fn(logits, out, **control_tables(sub))
        assert torch.equal(logits, raw), "the input logits must stay intact (out of place)"
        out = out.cpu()
        for r, (p, prompt, output, step) in enumerate(rows):
            if p is None:
                assert torch.isnan(out[r]).all(), f"row {r} has no controls: it must not be written"
                continue
            want = reference_row(raw[r].cpu(), p, prompt, output, step)
            assert not torch.isnan(out[r]).any(), f"row {r}: not every element written"
            assert torch.equal(torch.isinf(out[r]), torch.isinf(want)), f"row {r}: -inf where the reference has"
            fin = torch.isfinite(want)
            torch.testing.assert_close(out[r][fin], want[fin], rtol=1e-6, atol=1e-5, msg=f"row {r} ({p})")


def test_every_sparse_entry_in_use(device):
    """300 logit_bias ids + EOS + 64 stop ids, min_tokens not reached: the sparse program's whole width."""
    st, sub, logits, rows = _case(3, 5000, 3, 1, device, kinds=["max"])
    assert all(r[0] is not None and len(r[0].logit_bias) == 300 for r in rows)
    out = torch.full_like(logits, float("nan"))
    logits_process(logits, out, **control_tables(sub))
    for r, (p, prompt, output, step) in enumerate(rows):
        want = reference_row(logits[r].cpu(), p, prompt, output, step)
        assert torch.equal(torch.isinf(out[r].cpu()), torch.isinf(want))
        torch.testing.assert_close(out[r].cpu()[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-6,
                                   atol=1e-5)


def test_apply_controls_keeps_plain_rows_and_counts_only_controlled_ones(device):
    st, sub, logits, rows = _case(6, 700, 8, 5, device)
    got = apply_controls(logits, sub)
    for r, (p, prompt, output, step) in enumerate(rows):
        want = logits[r] if p is None else reference_row(logits[r].cpu(), p, prompt, output, step).to(device)
        torch.testing.assert_close(got[r], want, rtol=1e-6, atol=1e-5)
    before = st.counts.clone()
    tokens = torch.arange(6, device=device) * 17
    count_tokens_(sub, tokens, active=torch.tensor([1, 1, 1, 0, 1, 1], device=device))
    for r, (p, *_rest) in enumerate(rows):
        slot, t = int(sub.slots[r]), int(tokens[r])
        added = int(st.counts[slot, t] - before[slot, t])
        assert added == (1 if p is not None and r != 3 else 0), (r, p)
    assert int((st.counts - before).abs().sum()) == sum(p is not None and r != 3 for r, (p, *_) in enumerate(rows))


def test_sample_with_a_strong_bias_forces_the_token_and_leaves_the_raw_logits(device):
    V = 3000
    st = SamplingState(4, device, V)
    p = SamplingParams(logit_bias={1234: 100.0}, max_tokens=8)
    for i in (0, 2):
        st.set(i, p)
        write_controls_(st, i, plan_controls(p, [], [], EOS, V))
    for i in (1, 3):
        st.set(i, SamplingParams())
    logits = torch.randn(4, V, device=device)
    raw = logits.clone()
    tok = sample(logits, st.rows(slice(0, 4)), greedy_only=True, controls=True)
    assert tok.tolist() == [1234, int(raw[1].argmax()), 1234, int(raw[3].argmax())]
    assert torch.equal(logits, raw)


@pytest.mark.parametrize("kw,msg", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"logit_bias": {5: 101}}, r"logit_bias\[5\]"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "at most 300"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"), ({"stop_token_ids": (1, -4)}, r"stop_token_ids\[1\]"),
    ({"stop_token_ids": tuple(range(65))}, "at most 64"),
])
def test_bad_controls_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_ids_outside_the_vocabulary_are_named():
    with pytest.raises(ValueError, match=r"logit_bias: token id 100 is outside the vocabulary \(0..99\)"):
        SamplingParams(logit_bias={100: 1.0}).check_vocab(100)
    with pytest.raises(ValueError, match=r"stop_token_ids\[1\]: token id 100"):
        SamplingParams(stop_token_ids=(3, 100)).check_vocab(100)
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=(99,)).check_vocab(100)
