"""Triton GEMV tiles for the tensor-parallel shard shapes of Pixtral-12B (batch-1 decode).

decoder.GEMV_CONFIGS was swept on the whole model's shapes; a TP=n rank's linears are n times narrower
(wqkv / w13 / lm_head fewer rows, wo / w2 shorter rows) and fall back to gemv()'s default tile. Per shard
shape: every candidate tile is checked against torch's bf16 matmul (max |diff| within 2x torch's own error
against fp32) and timed alone (median, L2 flushed by do_bench); achieved TB/s against the copy bandwidth of
the same run, baseline the default tile. Writes the best tiles as JSON (--out) for bench_tp_shard.py
--gemv-configs.

    python -m benchmarks.sweep_gemv_tp [--tp 2] [--out /tmp/gemv_tp.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import bench_ms, copy_bandwidth_TBps, record
from pixtral_rt.config import PIXTRAL_12B
from pixtral_rt.kernels.gemv import gemv
from pixtral_rt.sharding import sharded_args

DEFAULT = (8, 512, 4, 4)
CANDIDATES = [DEFAULT, (4, 512, 4, 4), (8, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 4), (4, 1024, 4, 4),
              (8, 1024, 8, 3)]


def shard_shapes(tp: int) -> dict[str, tuple[int, int]]:
    t = sharded_args(PIXTRAL_12B.text, tp)
    q, kv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    return {"wqkv": (q + 2 * kv, t.dim), "wo": (t.dim, q), "w13": (2 * t.hidden_dim, t.dim),
            "w2": (t.dim, t.hidden_dim), "output_vocab": (t.vocab_size // tp, t.dim)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", default="2")
    ap.add_argument("--out", default="/tmp/gemv_tp.json")
    a = ap.parse_args()
    bw = copy_bandwidth_TBps()
    torch.manual_seed(0)
    best: dict[str, dict] = {}
    for tp in (int(x) for x in a.tp.split(",")):
        for name, (N, K) in shard_shapes(tp).items():
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            want = (x.float() @ w.float().T)
            tol = 2 * (x @ w.T).float().sub(want).abs().max().item() + 1e-6
            res = {}
            for cfg in CANDIDATES:
                kw = dict(zip(("block_n", "block_k", "num_warps", "num_stages"), cfg))
                if N % kw["block_n"] or K % kw["block_k"]:
                    continue
                try:
                    err = gemv(x, w, **kw).float().sub(want).abs().max().item()
                    if err > tol:
                        print(f"WRONG: TP={tp} {name} {cfg}: max err {err:.3g} > {tol:.3g}")
                        continue
                    res[cfg] = bench_ms(lambda: gemv(x, w, **kw), warmup_ms=20, rep_ms=100)
                except Exception as exc:  # noqa: BLE001 - one tile failing must not stop the sweep
                    print(f"FAILED: TP={tp} {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            if DEFAULT not in res:
                continue
            cfg = min(res, key=res.get)
            tbs = lambda ms: w.numel() * 2 / ms / 1e9       # noqa: E731 - TB/s of weight reads
            record("gemv_tp", f"Pixtral-12B TP={tp} {name} {N}x{K}", "TB/s", tbs(res[cfg]), "TB/s",
                   f"default tile {DEFAULT}", tbs(res[DEFAULT]), bw, us=round(res[cfg] * 1e3, 2),
                   us_default=round(res[DEFAULT] * 1e3, 2), config=list(cfg),
                   all_us={str(list(c)): round(v * 1e3, 2) for c, v in res.items()})
            best[f"{N}x{K}"] = dict(zip(("block_n", "block_k", "num_warps", "num_stages"), cfg))
    with open(a.out, "w") as f:
        json.dump(best, f, indent=1)
    print(f"best tiles -> {a.out}")


if __name__ == "__main__":
    main()
