"""Split-KV decode attention (1 query per sequence, GQA 32/8, hd 128, bf16) vs SDPA, TB/s of K/V read.

Bytes: B * L * Hkv * D * 2 (K and V) * 2 bytes; floor = copy bandwidth measured in the same run (a 2 GiB
device copy, read + write counted). KV 1k / 4k / 32k / 128k, batch 1 and 16. triton's do_bench clears L2
between runs, so small caches are read from HBM. Sweeps (BLOCK_N, num_warps, num_stages) and split counts.
"""
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench_ms, copy_bandwidth_TBps, record  # noqa: E402

from pixtral_rt.kernels.decode_attention import decode_attention, default_num_splits  # noqa: E402

HQ, HKV, D = 32, 8, 128
CONFIGS = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 4)]


def copy_bw():
    return copy_bandwidth_TBps()


def main():
    quick = "--quick" in sys.argv
    floor = copy_bw()
    print(f"copy bandwidth: {floor:.2f} TB/s")
    for B in (1, 16):
        for L in (1024, 4096, 32768, 131072):
            torch.manual_seed(B * L)
            kc = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
            lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
            nbytes = 2 * kc.numel() * 2
            qs = q[:, :, None]
            sdpa = nbytes / bench_ms(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)) / 1e9
            ns0 = default_num_splits(B, HKV, q.device)
            best = None
            for ns in (ns0, 2 * ns0) if not quick else (ns0,):
                for cfg in CONFIGS[:2] if quick else CONFIGS:
                    bn, nw, st = cfg
                    ms = bench_ms(lambda: decode_attention(q, kc, vc, lens, num_splits=ns, block_n=bn,
                                                           num_warps=nw, num_stages=st), rep_ms=100)
                    tb = nbytes / ms / 1e9
                    record("decode_attention", f"B{B}_L{L}_ns{ns}_cfg{bn}x{nw}x{st}", "TB/s", tb, "TB/s",
                           "sdpa_gqa", sdpa, floor, us=round(ms * 1e3, 2))
                    if best is None or tb > best[0]:
                        best = (tb, ns, cfg)
            if B == 1 and L == 4096:  # handed to bench_decode_step.py in the same device call
                with open("/tmp/decode_best.json", "w") as f:
                    json.dump(list(best[2]), f)
            record("decode_attention", f"B{B}_L{L}_best", "TB/s", best[0], "TB/s", "sdpa_gqa", sdpa, floor,
                   num_splits=best[1], config=list(best[2]))
            del kc, vc


if __name__ == "__main__":
    main()
