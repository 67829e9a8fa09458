"""Batched decode step of the serving engine, GPU only: the captured decode graph of the model runner
(paged KV cache, random Pixtral-12B weights) replayed at batch B with every row active at context C,
against the decode-step HBM roofline (all decoder weights read once per step + every row's K/V).

    python benchmarks/bench_decode_batch.py [--batches 1,8,16,32,64] [--context 1024]

This isolates the device work of a decode step from the server (HTTP, scheduling, streaming): the
difference between this rate and bench_serve.py's decode case is host-side cost.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_TBps, record  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    import torch
    from pixtral_rt.loading import decoder_weight_bytes, kv_bytes_per_token
    from pixtral_rt.serving.llm_engine import LLMEngine
    batches = [int(b) for b in a.batches.split(",")]
    span = a.context + a.iters + 8                       # positions a row reaches during the timing
    eng = LLMEngine.load(None, max_batch=max(batches), max_context=span + 64,
                         kv_tokens=(max(batches) + 2) * (span + 128), progress=False)
    r, P = eng.runner, eng.pool.page_size
    bw = copy_bandwidth_TBps() * 1e12
    wbytes, kvtok = decoder_weight_bytes(eng.args), kv_bytes_per_token(eng.args)
    n_pages = -(-span // P)
    with torch.inference_mode():
        for b in range(max(batches)):       # each row its own pages, filled with random K/V
            r.block_table[b, :n_pages] = torch.arange(1 + b * n_pages, 1 + (b + 1) * n_pages, dtype=torch.int32)
        k = r.model.decoder.k_pages
        k.normal_(0, 1)
        r.model.decoder.v_pages.normal_(0, 1)
        r.tokens.random_(0, eng.args.text.vocab_size)
        for B in batches:
            fwd, smp = r._fwd_graphs[B][0], r._sample_graphs[(B, True, False)]   # the step: forward, then sampling
            r.active.zero_()
            r.active[:B] = 1
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            for _ in range(3):
                r.positions[:B] = a.context
                fwd.replay()
                smp.replay()
            r.positions[:B] = a.context - a.iters // 2     # mean context = a.context
            torch.cuda.synchronize()
            ev[0].record()
            for _ in range(a.iters):
                fwd.replay()
                smp.replay()
            ev[1].record()
            torch.cuda.synchronize()
            ms = ev[0].elapsed_time(ev[1]) / a.iters
            floor = B * bw / (wbytes + B * kvtok * a.context)
            tps = B * 1e3 / ms
            record("decode_batch", f"B{B}_ctx{a.context}", "tok_s", tps, "tok/s", "decode-step HBM roofline", floor,
                   floor, step_ms=ms, fraction_of_roofline=tps / floor)
    eng.shutdown()


if __name__ == "__main__":
    main()
