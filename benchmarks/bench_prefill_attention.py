"""Causal GQA prefill attention (32 q / 8 kv heads, hd 128, bf16) vs SDPA, TFLOP/s at 4k and 16k tokens.

FLOPs (causal, useful half): 2 * Hq * T^2 * D (QK^T and PV, 2 FLOP per MAC, half the square).
Floor: a bf16 8192^3 matmul measured in the same run (tensor-core ceiling). Sweeps tile configs
(BLOCK_M, BLOCK_N, num_warps, num_stages); also times the full op (RoPE + cache write + attention).
Usage: python benchmarks/bench_prefill_attention.py [--quick]
"""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench_ms, record  # noqa: E402

from pixtral_rt.kernels.prefill_attention import prefill_attention, prefill_attention_cached, rope_table  # noqa: E402

HQ, HKV, D = 32, 8, 128
CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)]


def main():
    quick = "--quick" in sys.argv
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / bench_ms(lambda: x @ y) / 1e9
    del x, y
    print(f"bf16 8192^3 matmul: {mm:.0f} TFLOP/s (floor for attention FLOPs)")
    for T in (4096, 16384):
        torch.manual_seed(T)
        flops = 2 * HQ * T * T * D
        q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        qs, ks, vs = q.transpose(0, 1).contiguous()[None], kc, vc  # SDPA layout (1, H, T, D)
        sdpa = flops / bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                          enable_gqa=True)) / 1e9
        best = None
        for cfg in CONFIGS[:2] if quick else CONFIGS:
            try:
                ms = bench_ms(lambda: prefill_attention_cached(q, kc, vc, 0, 0, config=cfg))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a config
                print(f"config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            tf = flops / ms / 1e9
            record("prefill_attention", f"T{T}_cfg{'x'.join(map(str, cfg))}", "TFLOP/s", tf, "TFLOP/s",
                   "sdpa_causal_gqa", sdpa, mm, ms=round(ms, 4))
            if best is None or tf > best[0]:
                best = (tf, cfg)
        record("prefill_attention", f"T{T}_best", "TFLOP/s", best[0], "TFLOP/s", "sdpa_causal_gqa", sdpa, mm,
               config=list(best[1]))
        # the whole op: RoPE of q/k + K/V cache write + attention (what the decoder calls)
        cs = rope_table(T, D, 1e9, "cuda")
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        ms = bench_ms(lambda: prefill_attention(qkv, kc, vc, 0, 0, cs, HQ, HKV, config=best[1]))
        record("prefill_attention", f"T{T}_with_rope_and_cache_write", "TFLOP/s", flops / ms / 1e9, "TFLOP/s",
               "sdpa_causal_gqa", sdpa, mm, config=list(best[1]), ms=round(ms, 4))
        del q, kc, vc, qkv


if __name__ == "__main__":
    main()
