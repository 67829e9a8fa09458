"""Tensor parallelism end to end on the multi-GPU machine: the engine at TP=1 and TP=N in one run
(Pixtral-12B), or TP=N alone (Pixtral-Large bf16: 246 GB, does not fit one GPU; weights drawn on the GPUs).

Per TP size: decode tok/s at ~1k-token context (floor: rank 0's weight bytes per token, i.e. its shard + the
replicated lm_head, over the measured copy bandwidth, before all-reduce cost), TTFT engine-side for one
1024x1024 image + ~30 tokens (a new image each repetition), the KV cache that fits; the ratio TP=N / TP=1
(target >= 1.7x for 12B at TP=2). The all-reduce cost per step: benchmarks/bench_allreduce.py (torchrun).

lm_head: replicated or vocab-parallel (PIXTRAL_RT_TP_LM_HEAD, pixtral_rt/sharding.py); all-reduce: NCCL or
symmetric-memory one-shot (PIXTRAL_RT_TP_ALLREDUCE, tensor_parallel.allreduce_impl). Comma lists measure
every combination at each TP size > 1 (case names say which), to pick the defaults.

    python -m benchmarks.bench_tp --model DIR --tp 1,2 [--lm-head replicated,vocab] [--allreduce nccl,symm]
    python -m benchmarks.bench_tp --random-weights Pixtral-Large-Instruct-2411 --tp 2
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.bench_e2e import request, ttft_flops
from benchmarks.bench_fp8 import _Encoder, run_engine, text_request
from benchmarks.common import copy_bandwidth_TBps, matmul_TFLOPs, record
from pixtral_rt.engine import kv_bytes_per_token, resolve_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--random-weights", metavar="PRESET")
    ap.add_argument("--quantization", choices=["fp8"])
    ap.add_argument("--tp", default="1,2", help="comma list of tensor-parallel sizes")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--lm-head", default="vocab", help="comma list of vocab (the default), replicated (TP > 1)")
    ap.add_argument("--allreduce", default="nccl", help="comma list of nccl, symm (TP > 1)")
    a = ap.parse_args()
    modes, impls = a.lm_head.split(","), a.allreduce.split(",")
    if not set(modes) <= {"replicated", "vocab"}:
        ap.error(f"--lm-head: {a.lm_head!r} is not a comma list of replicated, vocab")
    if not set(impls) <= {"nccl", "symm"}:
        ap.error(f"--allreduce: {a.allreduce!r} is not a comma list of nccl, symm")
    bw, rate = copy_bandwidth_TBps() * 1e12, matmul_TFLOPs() * 1e12
    enc = _Encoder(resolve_model(a.model, None, None, None, None, a.random_weights))
    rng = np.random.default_rng(0)
    reqs = {"a_1img_1024": lambda: request(enc, "a_1img_1024", rng)[0], "c_text_1k": text_request(1000, rng)}
    res = {}
    for tp in (int(x) for x in a.tp.split(",")):
        for mode, impl in ([(m, i) for m in modes for i in impls] if tp > 1 else [("replicated", "nccl")]):
            # read by every rank (followers inherit the environment)
            os.environ.update(PIXTRAL_RT_TP_LM_HEAD=mode, PIXTRAL_RT_TP_ALLREDUCE=impl)
            kw = {"model": a.model, "random_weights": a.random_weights, "quantization": a.quantization,
                  "tensor_parallel": tp}
            res[(tp, mode, impl)] = run_engine(f"tp{tp}-{mode}-{impl}", kw, reqs, {}, a.tokens, max_context=8192)
    base = res.get((1, "replicated", "nccl"))
    for (tp, mode, impl), r in res.items():
        args = r["args"]
        name = f"{args.name} TP={tp}" + (f" lm_head {mode} all-reduce {impl}" if tp > 1 else "")
        c = reqs["c_text_1k"]
        floor = bw / (r["weight_bytes"] + kv_bytes_per_token(args) / tp * (c.prompt_tokens + a.tokens / 2))
        o = r["speed"].get("c_text_1k")
        if o:
            record("tp", f"{name} c_text_1k", "decode_tok_s", o["decode_tok_s"], "tok/s",
                   "TP=1 engine (same run)" if base else None,
                   base["speed"]["c_text_1k"]["decode_tok_s"] if base and tp != 1 else None, floor,
                   fraction_of_floor=round(o["decode_tok_s"] / floor, 3), rank0_weight_GB=r["weight_bytes"] / 1e9,
                   kv_cache_tokens=r["info"].get("kv_cache_tokens"), load_s=round(r["load_s"], 1))
        o = r["speed"].get("a_1img_1024")
        if o:
            req = reqs["a_1img_1024"]()
            record("tp", f"{name} a_1img_1024", "ttft_ms_engine", o["ttft_ms"], "ms",
                   "TP=1 engine (same run)" if base else None,
                   base["speed"]["a_1img_1024"]["ttft_ms"] if base and tp != 1 else None,
                   ttft_flops(args, req) / rate / tp * 1e3, ttft_cold_ms=round(o["ttft_cold_ms"], 1))
        for case, why in r.get("failed", {}).items():
            print(f"NOT MEASURED: {name} {case}: {why}")


if __name__ == "__main__":
    main()
