"""What one rank of a tensor-parallel decoder computes per decode step, timed on ONE GPU with no
communication: the compute ceiling of TP=n and the all-reduce budget a target leaves.

Per model and TP size n: rank 0's decoder shard (n_heads / n, n_kv_heads / n and hidden_dim / n per layer, the
real dim; FastDecoder with no process group, so its 2 x n_layers all-reduces are absent) takes one decode step
replayed from a CUDA graph at ~1k context, random N(0, 0.02) bf16 weights drawn on the GPU. Twice: with the
lm_head whole on the rank (replicated) and with vocab / n of its rows (vocab-parallel, without its logits
all-gather). Pixtral-12B also runs whole (TP=1) in the same run as the baseline.

Reported per case: tok/s without communication, the floor (the rank's weight + KV bytes at the copy
bandwidth measured in the same run), and the all-reduce budget: how long each of the step's 2 x n_layers
all-reduces may take before the target is missed (12B: 1.7x TP=1's step; Pixtral-Large: 28 tok/s; issue 11).
What communication really costs between GPUs: benchmarks/bench_allreduce.py on the multi-GPU machine.

    python -m benchmarks.bench_tp_shard [--models Pixtral-12B-2409,Pixtral-Large-Instruct-2411] [--tp 2,4]
"""
from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.bench_decode_step import RandomWeights
from benchmarks.common import bench_ms, copy_bandwidth_TBps, record
from pixtral_rt.config import PRESETS
from pixtral_rt.decoder import FastDecoder
from pixtral_rt.sharding import sharded_args

CTX = 1000
TARGETS = {"Pixtral-12B-2409": ("speedup", 1.7), "Pixtral-Large-Instruct-2411": ("tok_s", 28.0)}


def step_ms(dec: FastDecoder, B: int) -> float:
    """One graph-replayed decode step of B rows at position CTX (random tokens below the lm_head's rows)."""
    g = dec.capture_decode(B)
    g.tokens.copy_(torch.randint(0, dec.output.shape[0], (B,), device="cuda"))
    g.positions.fill_(CTX)
    ms = bench_ms(g.graph.replay, warmup_ms=100, rep_ms=500)
    del g
    return ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="Pixtral-12B-2409,Pixtral-Large-Instruct-2411")
    ap.add_argument("--tp", default="2", help="comma list of TP sizes to emulate (rank 0's shard)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gemv-configs", help="JSON {'NxK': tile} from benchmarks/sweep_gemv_tp.py for the shard "
                                           "shapes (case names say 'tuned tiles')")
    a = ap.parse_args()
    tiles = {}
    if a.gemv_configs:
        import json
        tiles = {tuple(int(v) for v in k.split("x")): cfg for k, cfg in json.load(open(a.gemv_configs)).items()}
    tag = " tuned tiles" if tiles else ""
    bw = copy_bandwidth_TBps() * 1e12
    batches = [int(b) for b in a.batches.split(",")]
    torch.manual_seed(0)
    for name in a.models.split(","):
        args = PRESETS[name].text
        kv_per_row = args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2 * (CTX + 1)     # bytes at ctx 1k
        base = {}
        sizes = ([1] if name == "Pixtral-12B-2409" else []) + [int(n) for n in a.tp.split(",")]
        for n in sizes:
            t = sharded_args(args, n)
            dec = FastDecoder(t, RandomWeights(t), max_batch=max(batches), max_seq=CTX + 64,
                              decode_fusion="none+pdl")     # the decode path tensor parallelism allows
            dec.k_cache.normal_()
            dec.v_cache.normal_()
            if n > 1:
                dec.gemv_configs.update(tiles)
            full_out = dec.output
            for mode in (["whole"] if n == 1 else ["replicated", "vocab"]):
                if mode == "vocab":                          # this rank's rows of the lm_head only
                    dec.output = full_out[: args.vocab_size // n].contiguous()
                for B in batches:
                    ms = step_ms(dec, B)
                    nbytes = dec.weight_bytes_per_token + B * kv_per_row / n
                    floor = bw / nbytes * B
                    tok_s = B * 1e3 / ms
                    extra = dict(ms=round(ms, 4), rank_weight_GB=round(dec.weight_bytes_per_token / 1e9, 2),
                                 fraction_of_floor=round(tok_s / floor, 3), n_allreduce=2 * args.n_layers,
                                 communication="none (one rank alone on one GPU)")
                    kind, target = TARGETS.get(name, (None, None))
                    if n == 1:
                        base[B] = ms
                        record("tp_shard", f"{name} TP=1 B={B} ctx1k", "decode_tok_s_no_comm", tok_s, "tok/s",
                               None, None, floor, **extra)
                        continue
                    # the step time the target allows: 1.7x TP=1's step, or 1 / 28 s (each sequence of the
                    # batch decodes at 28 tok/s)
                    budget_ms = (base[B] / target if kind == "speedup" and B in base
                                 else 1e3 / target if kind == "tok_s" else None)
                    if budget_ms is not None:
                        extra["target"] = f"{target}x TP=1" if kind == "speedup" else f"{target} tok/s"
                        extra["allreduce_budget_us"] = round((budget_ms - ms) * 1e3 / (2 * args.n_layers), 2)
                    record("tp_shard", f"{name} TP={n} rank0 lm_head {mode} B={B} ctx1k{tag}", "decode_tok_s_no_comm",
                           tok_s, "tok/s", "TP=1 decoder (same run)" if B in base else None,
                           B * 1e3 / base[B] if B in base else None, floor, **extra)
            del dec, full_out
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
