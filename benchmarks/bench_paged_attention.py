"""Paged KV-cache attention (GQA 32/8, hd 128, bf16, pages of P = 64 handed out in a shuffled order) vs the
contiguous-cache kernels and SDPA, measured in the same run.

Decode (paged_decode_attention) vs SDPA on a contiguous (B, Hkv, L, D) cache of the same size (the contiguous
  Triton decode kernel was removed with the static cache; its figures stay in results/), at B in {1, 16, 64} x KV in {1k, 4k, 32k}. TB/s of K/V read: B * L * Hkv * D * 2 (K and V) * 2 bytes
  per call; floor = copy bandwidth measured in the same run (a 2 GiB device copy, read + write counted).
  triton's do_bench clears L2 between runs, so small caches are read from HBM. A few (BLOCK_N, warps, stages).
Varlen prefill (paged_prefill_attention, one launch for all sequences) vs prefill_attention_cached (contiguous
  cache, one launch per sequence) vs SDPA (lower-right causal mask, sequences of equal shape batched, K/V
  heads expanded beforehand so the flash backend applies). TFLOP/s counts the useful causal work:
  4 * Hq * D * sum over new tokens of the keys each sees (QK^T and PV, 2 FLOP per MAC); floor = a bf16
  8192^3 matmul measured in the same run. Cases: 4 sequences x 1024 new tokens over 3072 cached each, and
  1 sequence of 4096 new tokens from position 0.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench_ms, copy_bandwidth_TBps, matmul_TFLOPs, record  # noqa: E402

from pixtral_rt.kernels.paged_decode_attention import default_num_splits, paged_decode_attention  # noqa: E402
from pixtral_rt.kernels.paged_prefill_attention import paged_prefill_attention  # noqa: E402
from pixtral_rt.kernels.prefill_attention import prefill_attention_cached  # noqa: E402

BENCH = "paged_attention"
DEVICE, DTYPE = "cuda", torch.bfloat16
HQ, HKV, D, P = 32, 8, 128, 64
DECODE_BATCHES = (1, 16, 64)
DECODE_LENS = (1024, 4096, 32768)
DECODE_CONFIGS = [(64, 4, 3), (64, 4, 4), (32, 4, 4), (64, 8, 3)]          # (BLOCK_N, num_warps, num_stages)
PREFILL_CASES = [("4x1024_over_3072", 4, 1024, 3072), ("1x4096_from_0", 1, 4096, 0),   # name, S, new, cached
                 ("1x7616_from_0", 1, 7616, 0),   # ~ the 4-image e2e prompt (7617 tokens)
                 ("1x1024_from_0", 1, 1024, 0), ("1x2048_from_0", 1, 2048, 0)]   # ~ the text-1k TTFT prompt
# (BLOCK_M, BLOCK_N, warps, stages). The page-table load of each key tile takes a pipeline stage of its own
# (sm_90 PTX: 2 K/V buffers at num_stages 3 where the contiguous kernel has 3), hence the deeper ones.
# (block_m, block_n, num_warps, num_stages, prefetch_table): the default first
PREFILL_CONFIGS = [(64, 64, 4, 3, False), (64, 64, 4, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 5, False),
                   (128, 64, 8, 5, True), (64, 64, 4, 4, True), (128, 32, 4, 4, False)]


def shuffled_pages(n_seqs: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V pages (n_seqs * n_tokens / P, HKV, P, D) and a table (n_seqs, n_tokens / P) of shuffled ids."""
    n_pages = n_seqs * n_tokens // P
    kp = torch.randn(n_pages, HKV, P, D, device=DEVICE, dtype=DTYPE)
    vp = torch.randn_like(kp)
    table = torch.randperm(n_pages, device=DEVICE).to(torch.int32).view(n_seqs, n_tokens // P)
    return kp, vp, table


def bench_decode(floor: float, quick: bool) -> None:
    for B in DECODE_BATCHES:
        for L in DECODE_LENS:
            torch.manual_seed(B * L)
            kp, vp, table = shuffled_pages(B, L)
            kc = torch.randn(B, HKV, L, D, device=DEVICE, dtype=DTYPE)
            vc = torch.randn_like(kc)
            q = torch.randn(B, HQ, D, device=DEVICE, dtype=DTYPE)
            lens = torch.full((B,), L, device=DEVICE, dtype=torch.int32)
            nbytes = 2 * kc.numel() * kc.element_size()
            qs = q[:, :, None]   # (B, HQ, 1, D)
            sdpa = nbytes / bench_ms(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)) / 1e9
            ns = default_num_splits(B, HKV, q.device)
            best = None
            for bn, nw, st in DECODE_CONFIGS[:1] if quick else DECODE_CONFIGS:
                ms = bench_ms(lambda: paged_decode_attention(q, kp, vp, table, lens, num_splits=ns, block_n=bn,
                                                             num_warps=nw, num_stages=st), rep_ms=100)
                tb = nbytes / ms / 1e9
                record(BENCH, f"decode_B{B}_L{L}_cfg{bn}x{nw}x{st}", "TB/s", tb, "TB/s", "sdpa_contiguous",
                       sdpa, floor, us=round(ms * 1e3, 2), num_splits=ns)
                if best is None or tb > best[0]:
                    best = (tb, (bn, nw, st))
            record(BENCH, f"decode_B{B}_L{L}_best", "TB/s", best[0], "TB/s", "sdpa_contiguous", sdpa,
                   floor, num_splits=ns, config=list(best[1]))
            del kp, vp, kc, vc


def bench_prefill(floor: float, quick: bool, cases: set | None = None) -> None:
    for name, S, new, cached in PREFILL_CASES:
        if cases and name not in cases:
            continue
        torch.manual_seed(S * new + cached)
        total = cached + new
        kp, vp, table = shuffled_pages(S, total)
        kc = torch.randn(S, HKV, total, D, device=DEVICE, dtype=DTYPE)   # slot s = sequence s
        vc = torch.randn_like(kc)
        q = torch.randn(S * new, HQ, D, device=DEVICE, dtype=DTYPE)      # new tokens, packed by sequence
        cu_q = torch.arange(0, S * new + 1, new, device=DEVICE, dtype=torch.int32)
        start_pos = torch.full((S,), cached, device=DEVICE, dtype=torch.int32)
        flops = 4 * HQ * D * S * (new * cached + new * (new + 1) // 2)
        # SDPA: (S, HQ, new, D) queries over (S, HQ, total, D) keys, query t at position cached + t
        qs = q.view(S, new, HQ, D).transpose(1, 2)
        ks, vs = (c.repeat_interleave(HQ // HKV, dim=1) for c in (kc, vc))
        mask = causal_lower_right(new, total)
        sdpa = flops / bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)) / 1e9
        del ks, vs

        def contiguous():   # one launch per sequence
            for s in range(S):
                prefill_attention_cached(q[s * new:(s + 1) * new], kc, vc, s, cached)

        contig = flops / bench_ms(contiguous) / 1e9
        best = None
        for bm, bn, nw, st, pf in PREFILL_CONFIGS[:1] if quick else PREFILL_CONFIGS:
            ms = bench_ms(lambda: paged_prefill_attention(q, kp, vp, table, cu_q, start_pos, new, block_m=bm,
                                                          block_n=bn, num_warps=nw, num_stages=st,
                                                          prefetch_table=pf))
            tf = flops / ms / 1e9
            record(BENCH, f"prefill_{name}_cfg{bm}x{bn}x{nw}x{st}{'_prefetch' if pf else ''}", "TFLOP/s", tf, "TFLOP/s",
                   "prefill_attention_cached_per_sequence", contig, floor, sdpa_TFLOPs=round(sdpa, 2),
                   ms=round(ms, 4))
            if best is None or tf > best[0]:
                best = (tf, (bm, bn, nw, st, pf))
        record(BENCH, f"prefill_{name}_best", "TFLOP/s", best[0], "TFLOP/s", "prefill_attention_cached_per_sequence",
               contig, floor, sdpa_TFLOPs=round(sdpa, 2), config=list(best[1]))
        del kp, vp, kc, vc, q


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tile config per case")
    ap.add_argument("--only", choices=("decode", "prefill"), help="run one half")
    ap.add_argument("--cases", help="prefill cases to run, comma list (default all: "
                    + ", ".join(c[0] for c in PREFILL_CASES) + ")")
    args = ap.parse_args(argv)
    if args.only != "prefill":
        floor = copy_bandwidth_TBps()
        print(f"copy bandwidth: {floor:.2f} TB/s (floor for K/V reads)")
        bench_decode(floor, args.quick)
    if args.only != "decode":
        floor = matmul_TFLOPs()
        print(f"bf16 8192^3 matmul: {floor:.0f} TFLOP/s (floor for attention FLOPs)")
        cases = set(args.cases.split(",")) if args.cases else None
        unknown = (cases or set()) - {c[0] for c in PREFILL_CASES}
        if unknown:
            ap.error(f"--cases: unknown {sorted(unknown)}")
        bench_prefill(floor, args.quick, cases)


if __name__ == "__main__":
    main()
