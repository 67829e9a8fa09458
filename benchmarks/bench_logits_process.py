"""The sampling controls' logits pass (kernels/logits_process.py), GPU only, two measurements:

  kernel   the kernel alone on (B, V) fp32 logits with a fraction of the rows controlled (every control on:
           penalties, 300 logit_bias ids, min_tokens), against its plain-PyTorch twin on the same GPU and the
           floor: bytes a controlled row must move (logits + counts read, out written, 2 bit words per 32
           tokens) at the measured copy bandwidth.
  step     the runner's captured decode step at batch B (random Pixtral-12B weights, context C): the graph
           with controls (fraction f of the rows controlled) against the graph without (the baseline: what
           a batch with no controlled request runs).

    python benchmarks/bench_logits_process.py [--batches 1,64] [--fractions 0,0.5,1] [--context 1024] [--no-step]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, copy_bandwidth_TBps, record  # noqa: E402

EOS = 2


def _controls(V: int, seed: int):
    import numpy as np
    from pixtral_rt.sampling import SamplingParams
    g = np.random.default_rng(seed)
    return SamplingParams(max_tokens=64, presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.2,
                          min_tokens=8, stop_token_ids=(5, 6),
                          logit_bias={int(t): 1.0 for t in g.choice(V, 300, replace=False)})


def _state(S: int, V: int, controlled: int, device="cuda"):
    """A SamplingState over S slots whose first `controlled` slots carry every control (prompt of 1000 ids,
    200 output tokens so far)."""
    import numpy as np
    from pixtral_rt.sampling import SamplingState
    from pixtral_rt.sampling_controls import plan_controls, write_controls_
    st = SamplingState(S, device, V)
    g = np.random.default_rng(0)
    for s in range(controlled):
        write_controls_(st, s, plan_controls(_controls(V, s), g.integers(0, V, 1000), g.integers(0, V, 200), EOS, V))
    return st


def bench_kernel(batches, fractions, V: int) -> None:
    import torch
    from pixtral_rt.kernels.logits_process import logits_process, logits_process_torch
    from pixtral_rt.sampling_controls import control_tables
    bw = copy_bandwidth_TBps() * 1e12
    for B in batches:
        logits = torch.randn(B, V, device="cuda") * 5
        out = torch.empty_like(logits)
        for f in fractions:
            n = round(B * f)
            st = _state(B, V, n).rows(slice(0, B))
            t = control_tables(st)
            ms = bench_ms(lambda: logits_process(logits, out, **t))
            base = bench_ms(lambda: logits_process_torch(logits, out, **t))
            floor_ms = n * V * (4 + 4 + 4 + 2 * 4 / 32) / bw * 1e3
            record("logits_process", f"kernel B={B} V={V} controlled={n}", "time", ms * 1e3, "us",
                   "torch twin", base * 1e3, floor_ms * 1e3)


def bench_step(batches, fractions, context: int) -> None:
    import torch
    from pixtral_rt.sampling_controls import plan_controls, write_controls_
    from pixtral_rt.serving.llm_engine import LLMEngine
    import numpy as np
    span = context + 64
    eng = LLMEngine.load(None, max_batch=max(batches), max_context=span + 64,
                         kv_tokens=(max(batches) + 2) * (span + 128), progress=False)
    r, P, V = eng.runner, eng.pool.page_size, eng.args.text.vocab_size
    n_pages = -(-span // P)
    g = np.random.default_rng(0)
    with torch.inference_mode():
        for b in range(max(batches)):
            r.block_table[b, :n_pages] = torch.arange(1 + b * n_pages, 1 + (b + 1) * n_pages, dtype=torch.int32)
        r.model.decoder.k_pages.normal_(0, 1)
        r.model.decoder.v_pages.normal_(0, 1)
        r.tokens.random_(0, V)
        for B in batches:
            r.active.zero_()
            r.active[:B] = 1

            def run(controls: bool):
                fwd, smp = r._fwd_graphs[B][0], r._sample_graphs[(B, True, controls)]

                def step():                                   # the decode step: forward, then sampling
                    r.positions[:B] = context                 # the graph advances it: reset each replay
                    fwd.replay()
                    smp.replay()
                return bench_ms(step, warmup_ms=100, rep_ms=500)

            base = run(False)
            for f in fractions:
                n = round(B * f)
                r.sampling.ctl.zero_()
                for s in range(n):
                    write_controls_(r.sampling, s, plan_controls(_controls(V, s), g.integers(0, V, 1000),
                                                                 g.integers(0, V, 200), eng.eos_id, V))
                ms = run(True)
                record("logits_process", f"decode step B={B} C={context} controlled={n}", "time", ms, "ms",
                       "graph without controls", base, None, overhead=round(ms / base - 1, 4))
            r.sampling.ctl.zero_()
    eng.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--fractions", default="0,0.5,1")
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--no-step", action="store_true", help="the kernel alone only (no model load)")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_logits_process: needs a CUDA GPU")
    batches, fractions = [int(b) for b in a.batches.split(",")], [float(f) for f in a.fractions.split(",")]
    bench_kernel(batches, fractions, a.vocab)
    if not a.no_step:
        bench_step(batches, fractions, a.context)


if __name__ == "__main__":
    main()
