"""FP8 linear kernels on the decoder's shapes (GPU), each beside its bf16 baseline measured in the same run.

  decode M = 1..64      W8A8 (what the decoder runs): kernels/fp8_gemm.py backend "skinny", tile sweep, alone and
                        with its kernels/fp8_quant.py launch; vs the W8A16 kernels/fp8_gemv.py (the decode path
                        before, its tuned tiles of 2026-12-02) and bf16 (the Triton GEMV at M = 1, cuBLAS
                        F.linear), all in the same run; floor: FP8 weight bytes / measured copy bandwidth
  prefill M = 512, 4193 (--prefill) kernels/fp8_gemm.py: torch._scaled_mm and the Triton GEMM (per-token
                        activation quantisation included, and alone) vs cuBLAS bf16; TFLOP/s = 2 M N K / t
  quant                 (--prefill) kernels/fp8_quant.py GB/s (read 2 B + write 1 B per element) vs copy bandwidth

Weights rotate through copies larger than L2 (a decode step never finds W in cache); decode cases are timed as
CUDA-graph replays. Prints the best skinny tiles per shape and padded row count as a Python dict for
pixtral_rt/decoder.py (FP8_DECODE_CONFIGS).

    python -m benchmarks.bench_fp8_linear [--model 12b|large|both] [--full-sweep] [--prefill]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, copy_bandwidth_TBps, record
from pixtral_rt.config import PIXTRAL_12B, PIXTRAL_LARGE
from pixtral_rt.fp8 import quantize_weight
from pixtral_rt.kernels.fp8_gemm import fp8_gemm
from pixtral_rt.kernels.fp8_gemv import fp8_gemv
from pixtral_rt.kernels.fp8_quant import fp8_quant
from pixtral_rt.kernels.gemv import gemv

BENCH = "fp8_linear"


def shapes(args) -> dict[str, tuple[int, int]]:
    t = args.text
    return {"wqkv": ((t.n_heads + 2 * t.n_kv_heads) * t.head_dim, t.dim), "wo": (t.dim, t.n_heads * t.head_dim),
            "w13": (2 * t.hidden_dim, t.dim), "w2": (t.dim, t.hidden_dim)}


class Rotating:
    """Copies of one weight shape totalling >= 256 MB; each call takes the next (never L2-resident)."""

    def __init__(self, N, K):
        n = max(2, -(-(256 << 20) // (N * K)))
        w = torch.randn(N, K, device="cuda") * 0.02
        w8, s = quantize_weight(w)
        self.fp8 = [(w8.clone(), s.reshape(-1).contiguous()) for _ in range(n)]
        self.bf16 = [w.to(torch.bfloat16) for _ in range(max(2, n // 2))]
        self.i = 0

    def next_fp8(self):
        self.i += 1
        return self.fp8[self.i % len(self.fp8)]

    def next_bf16(self):
        self.i += 1
        return self.bf16[self.i % len(self.bf16)]


def graph_ms(fn, n: int = 16) -> float:
    """Milliseconds per call of fn() (which rotates its weights), timed as replays of a CUDA graph of n calls:
    a decode step is replayed from a graph, so Python launch overhead must not count."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return bench_ms(g.replay, warmup_ms=20, rep_ms=100) / n


def best_of(fn_of_cfg, cfgs):
    best = None
    for cfg in cfgs:
        try:
            ms = graph_ms(lambda: fn_of_cfg(cfg))
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit shared memory / registers
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best


# the W8A16 GEMV / skinny tiles the decoder used before W8A8 (tuned on an H200, 2026-12-02): the baseline
W8A16_M1 = {(6144, 5120): dict(block_n=8, block_k=512, num_warps=8, num_stages=4),
            (5120, 4096): dict(block_n=8, block_k=512, num_warps=8, num_stages=4),
            (28672, 5120): dict(block_n=8, block_k=512, num_warps=4, num_stages=4),
            (5120, 14336): dict(block_n=8, block_k=512, num_warps=8, num_stages=4)}
W8A16_SKINNY = dict(block_n=32, block_k=128, num_warps=4, num_stages=4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["12b", "large", "both"], default="12b")
    ap.add_argument("--full-sweep", action="store_true", help="more skinny tiles (slower)")
    ap.add_argument("--prefill", action="store_true", help="also the prefill GEMMs and the quantiser")
    ap.add_argument("--rows", default="1,2,16,32,64", help="decode row counts")
    ap.add_argument("--w8a16-sweep", action="store_true",
                    help="also sweep the 1-row W8A16 GEMV's tiles (kernels/fp8_gemv.py; prints FP8_GEMV_CONFIGS)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="the skinny kernel with the committed tiles only (pixtral_rt/decoder.py FP8_DECODE_CONFIGS)")
    a = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth_TBps() * 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    models = {"12b": [PIXTRAL_12B], "large": [PIXTRAL_LARGE], "both": [PIXTRAL_12B, PIXTRAL_LARGE]}[a.model]
    from pixtral_rt.decoder import FP8_DECODE_CONFIGS, GEMV_CONFIGS
    sweep = itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8), (3, 4, 5), (1, 2, 4)) if a.full_sweep else \
        itertools.product((16, 32, 64, 128), (256, 512), (4,), (3, 4), (1, 4))
    sweep = list(sweep)
    best_skinny, best_gemv = {}, {}
    for args in models:
        for name, (N, K) in shapes(args).items():
            rot = Rotating(N, K)
            case = f"{args.name} {name} ({N}x{K})"
            fp8_bytes = N * K + 4 * N
            for M in (int(r) for r in a.rows.split(",")):
                bm = min(64, max(16, 1 << (M - 1).bit_length()))
                xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                x8, sx = fp8_quant(xm)
                cfgs = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=sk)
                        for bn, bk, w, st, sk in sweep]
                if a.no_sweep:
                    cfgs = [dict(block_m=bm, **FP8_DECODE_CONFIGS.get((N, K), {}).get(bm, {}))]
                ms, cfg = best_of(lambda c: fp8_gemm(x8, sx, *rot.next_fp8(), backend="skinny", **c), cfgs)
                ms_q = graph_ms(lambda: fp8_quant(xm))
                ms_both = graph_ms(lambda: fp8_gemm(*fp8_quant(xm), *rot.next_fp8(), backend="skinny", **cfg))
                if M == 1:
                    ms_old = graph_ms(lambda: fp8_gemv(xm, *rot.next_fp8(), **W8A16_M1.get((N, K), {})))
                    if a.w8a16_sweep:
                        gcfgs = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st) for bn, bk, w, st in
                                 itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (3, 4))]
                        # one warp: x's K slice lands in the tile's layout, so the loop has no shared-memory
                        # broadcast and no barrier (benchmarks/kernel_sass.py: 3.3-3.7 instructions a weight)
                        gcfgs += [dict(block_n=bn, block_k=bk, num_warps=1, num_stages=st) for bn, bk, st in
                                  itertools.product((2, 4, 8), (256, 512), (2, 3, 4)) if bn * bk <= 4096]
                        ms_g, cfg_g = best_of(lambda c: fp8_gemv(xm, *rot.next_fp8(), **c), gcfgs)
                        best_gemv[(N, K)] = cfg_g
                        record(BENCH, f"{case} M=1 w8a16 swept", "time", ms_g * 1e3, "us",
                               "W8A16 fp8_gemv, committed tiles (same run)", ms_old * 1e3, fp8_bytes / bw * 1e6,
                               weight_read_TBps=fp8_bytes / ms_g / 1e9, config=cfg_g, timing="cuda graph")
                        ms_old = min(ms_old, ms_g)
                    ms_bf = graph_ms(lambda: gemv(xm, rot.next_bf16(), **GEMV_CONFIGS.get((N, K), {})))
                else:
                    ms_old = graph_ms(lambda: fp8_gemv(xm, *rot.next_fp8(), block_m=bm, **W8A16_SKINNY))
                    ms_bf = graph_ms(lambda: F.linear(xm, rot.next_bf16()))
                if M in (1, 16, 32, 64) and bm not in best_skinny.get((N, K), {}):
                    best_skinny.setdefault((N, K), {})[bm] = {k: v for k, v in cfg.items() if k != "block_m"}
                record(BENCH, f"{case} M={M} w8a8", "time", ms_both * 1e3, "us", "W8A16 fp8_gemv (same run)",
                       ms_old * 1e3, fp8_bytes / bw * 1e6, gemm_us=ms * 1e3, quant_us=ms_q * 1e3,
                       weight_read_TBps=fp8_bytes / ms / 1e9, bf16_us=ms_bf * 1e3,
                       bf16_kernel="Triton GEMV (tuned)" if M == 1 else "cuBLAS F.linear",
                       speedup_vs_w8a16=ms_old / ms_both, config=cfg, timing="cuda graph")
                print(f"{case} M={M}: W8A8 {ms * 1e3:.1f} us (+ quant {ms_q * 1e3:.1f}; together {ms_both * 1e3:.1f}), "
                      f"{fp8_bytes / ms / 1e9:.2f} TB/s; W8A16 {ms_old * 1e3:.1f} us; bf16 {ms_bf * 1e3:.1f} us; "
                      f"floor {fp8_bytes / bw * 1e6:.1f} us; {cfg}", flush=True)
            if not a.prefill:
                del rot
                torch.cuda.empty_cache()
                continue
            # ---- prefill
            for M in (512, 4193):
                xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                wb = rot.next_bf16()
                w8, s = rot.next_fp8()
                flops = 2 * M * N * K
                ms_bf = bench_ms(lambda: F.linear(xm, wb))
                x8, sx = fp8_quant(xm)
                ms_q = graph_ms(lambda: fp8_quant(xm), n=4)
                res = {}
                for be in ("scaled_mm", "triton"):
                    res[be] = bench_ms(lambda: fp8_gemm(x8, sx, w8, s, backend=be))
                    record(BENCH, f"{case} M={M} {be}", "gemm_TFLOPs", flops / res[be] / 1e9, "TFLOP/s",
                           "cuBLAS bf16 F.linear", flops / ms_bf / 1e9, None, gemm_us=res[be] * 1e3,
                           quant_us=ms_q * 1e3, with_quant_TFLOPs=flops / (res[be] + ms_q) / 1e9)
                record(BENCH, f"{case} M={M} quant", "bandwidth_TBps", 3 * M * K / ms_q / 1e9, "TB/s", None, None,
                       bw / 1e12, time_us=ms_q * 1e3)
            del rot
            torch.cuda.empty_cache()
    if best_gemv:
        print("\nFP8_GEMV_CONFIGS = {")
        for k, c in best_gemv.items():
            print(f"    {k}: dict({', '.join(f'{p}={q}' for p, q in c.items())}),")
        print("}")
    print("\nFP8_DECODE_CONFIGS = {")
    for k, per in best_skinny.items():
        print(f"    {k}: {{" + ", ".join(f"{bm}: dict({', '.join(f'{a}={b}' for a, b in c.items())})"
                                      for bm, c in sorted(per.items())) + "},")
    print("}")
    import os
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fp8_tiles.json"), "w") as f:
            json.dump({str(k): v for k, v in best_skinny.items()}, f, indent=1)


if __name__ == "__main__":
    main()
