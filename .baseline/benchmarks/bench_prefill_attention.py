"""Causal GQA prefill attention (32 q / 8 kv heads, hd 128, bf16) vs SDPA, TFLOP/s at 4k and 16k tokens.

FLOPs (causal, useful half): 2 * Hq * T^2 * D (QK^T and PV, 2 FLOP per MAC, half the square).
Floor: a bf16 8192^3 matmul measured in the same run (tensor-core ceiling). Sweeps tile configs
(BLOCK_M, BLOCK_N, num_warps, num_stages); also times the full op (RoPE + cache write + attention).
Usage: python benchmarks/bench_prefill_attention.py [--quick] [--rope]
--rope: only rope_store_kv (new kernel vs the previous one-token-per-program kernel, kept below as the
baseline; GB/s vs the copy bandwidth of the same run) and the full op at 4k with the default tiles vs SDPA.
Bytes of rope_store_kv: q read + written, k and v read and written once, cos/sin read (fp32).
"""
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench_ms, copy_bandwidth_TBps, matmul_TFLOPs, record  # noqa: E402

from pixtral_rt.kernels.prefill_attention import (prefill_attention, prefill_attention_cached, rope_store_kv,  # noqa: E402
                                                  rope_table)


@triton.jit
def _rope_store_kv_v1(qkv_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, cs_ptr,
                      stride_qkv, stride_cb, stride_ch, stride_cs, stride_tab,
                      HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """The previous rope_store_kv (one token per program, stride-2 loads): the baseline."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    half = tl.arange(0, HEAD_DIM // 2)
    c = tl.load(cs_ptr + pos * stride_tab + 2 * half)[None, :]
    s = tl.load(cs_ptr + pos * stride_tab + 2 * half + 1)[None, :]
    row = qkv_ptr + t * stride_qkv
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    qm = hq < HQ
    qe_ptr = row + hq * HEAD_DIM + 2 * half[None, :]
    qe = tl.load(qe_ptr, mask=qm, other=0.0).to(tl.float32)
    qo = tl.load(qe_ptr + 1, mask=qm, other=0.0).to(tl.float32)
    tl.store(qe_ptr, (qe * c - qo * s).to(qkv_ptr.dtype.element_ty), mask=qm)
    tl.store(qe_ptr + 1, (qe * s + qo * c).to(qkv_ptr.dtype.element_ty), mask=qm)
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    km = hk < HKV
    ke_ptr = row + HQ * HEAD_DIM + hk * HEAD_DIM + 2 * half[None, :]
    ke = tl.load(ke_ptr, mask=km, other=0.0).to(tl.float32)
    ko = tl.load(ke_ptr + 1, mask=km, other=0.0).to(tl.float32)
    dst = slot * stride_cb + hk * stride_ch + pos * stride_cs + 2 * half[None, :]
    tl.store(k_cache_ptr + dst, (ke * c - ko * s).to(k_cache_ptr.dtype.element_ty), mask=km)
    tl.store(k_cache_ptr + dst + 1, (ke * s + ko * c).to(k_cache_ptr.dtype.element_ty), mask=km)
    d = tl.arange(0, HEAD_DIM)[None, :]
    v = tl.load(row + (HQ + HKV) * HEAD_DIM + hk * HEAD_DIM + d, mask=km, other=0.0)
    tl.store(v_cache_ptr + slot * stride_cb + hk * stride_ch + pos * stride_cs + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=km)


def rope_v1(qkv, positions, slots, kc, vc, cs):
    _rope_store_kv_v1[(qkv.shape[0],)](qkv, positions, slots, kc, vc, cs, qkv.stride(0), kc.stride(0), kc.stride(1),
                                       kc.stride(2), cs.stride(0), HQ=HQ, HKV=HKV, BLOCK_HQ=HQ, BLOCK_HKV=HKV,
                                       HEAD_DIM=D, num_warps=4)


def bench_rope():
    copy_tb = copy_bandwidth_TBps()
    for T in (1, 4096, 16384):
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        cs = rope_table(T, D, 1e9, "cuda")
        pos = torch.arange(T, device="cuda", dtype=torch.int32)
        slots = torch.zeros(T, device="cuda", dtype=torch.int32)
        nbytes = T * (2 * HQ * D * 2 + 4 * HKV * D * 2 + D * 4)
        old = bench_ms(lambda: rope_v1(qkv, pos, slots, kc, vc, cs))
        new = bench_ms(lambda: rope_store_kv(qkv, pos, slots, kc, vc, cs, HQ, HKV))
        record("prefill_attention", f"rope_store_kv_T{T}", "us", new * 1e3, "us", "rope_store_kv_v1_one_token_per_prog",
               old * 1e3, nbytes / copy_tb / 1e6, GBps=round(nbytes / new / 1e6, 1),
               GBps_v1=round(nbytes / old / 1e6, 1), copy_TBps=round(copy_tb, 3))
        del qkv, kc, vc

HQ, HKV, D = 32, 8, 128
CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)]


def main():
    quick = "--quick" in sys.argv
    rope_only = "--rope" in sys.argv
    if rope_only:
        bench_rope()
    mm = matmul_TFLOPs()
    print(f"bf16 8192^3 matmul: {mm:.0f} TFLOP/s (floor for attention FLOPs)")
    for T in (4096,) if rope_only else (4096, 16384):
        torch.manual_seed(T)
        flops = 2 * HQ * T * T * D
        q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        qs, ks, vs = q.transpose(0, 1).contiguous()[None], kc, vc  # SDPA layout (1, H, T, D)
        sdpa = flops / bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                          enable_gqa=True)) / 1e9
        best = None
        for cfg in CONFIGS[:1] if rope_only else CONFIGS[:2] if quick else CONFIGS:
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
