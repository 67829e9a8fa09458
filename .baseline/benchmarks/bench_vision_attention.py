"""Block-diagonal 2D-RoPE attention of the vision encoder: kernels/vision_attention.py vs stock PyTorch.

Shapes: 16 heads, head_dim 64, bf16; packs (patches per image): 4096+2048+1024+1024, 4096, 16 x 256.
Metric: useful TFLOP/s = 4 * H * D * sum(n_i^2) / time (only the FLOPs inside the diagonal blocks).
Ours includes the 2D RoPE of q and k; the stock baselines (as in ../shared/bench/hf_baseline.py) do not.
Variants: RoPE fused in the kernel ("half" layout, one fixed config: known slow, kept for the record),
RoPE of q and k in ONE launch on the fused (N, 3, H, D) qkv buffer (kernels/rope_2d.py) + autotuned attention
on the encoder's tile height (default_block_m: 64 on Hopper) -- what the encoder runs, the headline figure --
and the same with 128-row tiles, attention alone, and each of the autotuner's configs (attention alone, on
the tile height the config is for). The finer option sweep is benchmarks/sweep_vision_attention.py.
RoPE alone: ms and GB/s vs the copy-bandwidth floor (read + write of q and k), vs torch eager RoPE.
Floor: useful FLOPs at the bf16 matmul ceiling measured in this run (8192^3 torch matmul).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, matmul_TFLOPs, record
from pixtral_rt.kernels import vision_attention as va
from pixtral_rt.kernels.rope_2d import rope_2d_qk_
from pixtral_rt.reference.rope import apply_rope, vision_rope_angles

H, D = 16, 64
COPY_TBPS = 4.23  # H200 copy bandwidth (read + write), ../shared/reference/performance.md
PREV_ROPE_MS = {"4img_4096_2048_1024_1024": 0.3259, "1img_4096": 0.153}  # old rope_2d_ x2, H200 2026-11-22
CASES = {
    "4img_4096_2048_1024_1024": [(64, 64), (32, 64), (32, 32), (32, 32)],
    "1img_4096": [(64, 64)],
    "16img_256": [(16, 16)] * 16,
}


def matmul_ceiling_tflops() -> float:
    return matmul_TFLOPs()


def main():
    ceiling = matmul_ceiling_tflops()
    print(f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    for case, grids in CASES.items():
        lens = [r * c for r, c in grids]
        n = sum(lens)
        flops = va.useful_flops(lens, H, D)
        floor_tflops = ceiling
        q = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        pos = torch.cat([torch.stack([torch.arange(r).repeat_interleave(c), torch.arange(c).repeat(r)], -1)
                         for r, c in grids]).to(device="cuda", dtype=torch.int32)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        freqs = va.rope_pair_freqs(D, 10000.0, "cuda")
        out = torch.empty_like(q)
        tf = lambda ms: flops / ms / 1e9  # noqa: E731

        # ---- baselines (attention only, no RoPE), layout (1, H, N, D)
        qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
        seg = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
        base = {}
        if n <= 8192:
            mask = seg[:, None] == seg[None, :]
            base["sdpa_dense_bool_mask"] = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask))
            del mask

        def per_image():
            for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
                F.scaled_dot_product_attention(qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b])
        bounds = cu.tolist()

        def per_image_fast():
            for a, b in zip(bounds[:-1], bounds[1:]):
                F.scaled_dot_product_attention(qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b])
        base["sdpa_per_image"] = bench_ms(per_image_fast)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def doc(b, h, qi, ki):
                return seg[qi] == seg[ki]
            bm = create_block_mask(doc, None, None, n, n, device="cuda")
            fa = torch.compile(flex_attention)
            base["flex_document_mask"] = bench_ms(lambda: fa(qt, kt, vt, block_mask=bm))
        except Exception as ex:  # noqa: BLE001
            print("flex failed:", repr(ex)[:300])
        for name, ms in base.items():
            record("vision_attention", case, f"{name}_useful_tflops", tf(ms), "TFLOP/s", None, None, floor_tflops,
                   ms=ms, provider=name)

        # ---- ours (q, k, v as strided views of one fused qkv buffer, as in the encoder)
        qkv = torch.stack([q, k, v], 1)
        qv, kv, vv = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        plan = va.plan_vision_attention(lens, 128, device="cuda")
        bm = va.default_block_m("cuda", D)                 # what the encoder plans with (64 on Hopper)
        plan_d = va.plan_vision_attention(lens, bm, device="cuda")
        plans = {64: va.plan_vision_attention(lens, 64, device="cuda"), 128: plan}
        variants = {
            "fused_half_bm128_fixedcfg": lambda: va.vision_attention(
                qv, kv, vv, cu, plan, pos, freqs, layout="half", out=out,
                config={"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
            # the encoder's path: q and k rotated in one launch, then the autotuned attention
            f"rope_qk_kernel+attn_bm{bm}": lambda: (rope_2d_qk_(qkv, pos, freqs, H),
                                                   va.vision_attention(qv, kv, vv, cu, plan_d, rope=False, out=out)),
            f"attention_only_no_rope_bm{bm}": lambda: va.vision_attention(qv, kv, vv, cu, plan_d, rope=False,
                                                                          out=out),
        }
        if bm != 128:
            variants["rope_qk_kernel+attn_bm128"] = lambda: (rope_2d_qk_(qkv, pos, freqs, H),
                                                             va.vision_attention(qv, kv, vv, cu, plan, rope=False,
                                                                                 out=out))
        for cfg in va._configs():
            c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if cfg.maxnreg:
                c["maxnreg"] = cfg.maxnreg
            cbm = 64 if cfg.num_warps == 4 else 128
            if c["KV_DESC"] and not va.tma_eligible(qv, kv, vv, False):
                continue
            name = "attention_only_cfg_bm{}_bn{BLOCK_N}_w{num_warps}_s{num_stages}".format(cbm, **c) + (
                "_tma" if c["KV_DESC"] else "") + (f"_r{cfg.maxnreg}" if cfg.maxnreg else "")
            variants[name] = (lambda c=c, cbm=cbm: va.vision_attention(qv, kv, vv, cu, plans[cbm], rope=False,
                                                                       out=out, config=c))
        ref_ms = base["sdpa_per_image"]
        for name, fn in variants.items():
            try:
                fn()  # autotune outside timing
                torch.cuda.synchronize()
            except Exception as ex:  # noqa: BLE001
                print(f"{name} failed: {type(ex).__name__}: {str(ex)[:200]}")
                continue
            ms = bench_ms(fn)
            record("vision_attention", case, f"ours_{name}_useful_tflops", tf(ms), "TFLOP/s", "sdpa_per_image",
                   tf(ref_ms), floor_tflops, ms=ms, provider="ours_" + name,
                   flex_tflops=tf(base["flex_document_mask"]) if "flex_document_mask" in base else None)
        # RoPE alone: q and k read + written once
        rope_bytes = 2 * 2 * n * H * D * q.element_size()
        ang = vision_rope_angles(pos.long(), D, 10000.0)
        torch_ms = bench_ms(lambda: (apply_rope(qv, ang), apply_rope(kv, ang)))
        rope_ms = bench_ms(lambda: rope_2d_qk_(qkv, pos, freqs, H))
        floor_ms = rope_bytes / COPY_TBPS / 1e9
        record("vision_attention", case, "ours_rope_2d_qk_one_launch_ms", rope_ms, "ms", "torch_eager_apply_rope",
               torch_ms, floor_ms, gbps=rope_bytes / rope_ms / 1e6, prev_two_launch_kernel_ms_h200=PREV_ROPE_MS.get(case))
    print("autotune choices:", json.dumps(va.best_config()))


if __name__ == "__main__":
    sys.exit(main())
