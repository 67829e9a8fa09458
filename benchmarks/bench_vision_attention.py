"""Block-diagonal 2D-RoPE attention of the vision encoder: kernels/vision_attention.py vs stock PyTorch.

Shapes: 16 heads, head_dim 64, bf16; packs (patches per image): 4096+2048+1024+1024, 4096, 16 x 256.
Metric: useful TFLOP/s = 4 * H * D * sum(n_i^2) / time (only the FLOPs inside the diagonal blocks).
Ours includes the 2D RoPE of q and k; the stock baselines (as in ../shared/bench/hf_baseline.py) do not.
Variants: RoPE fused in the kernel ("half" = HF-permuted wq/wk layout, "interleaved" = Mistral layout),
RoPE in a separate kernel (kernels/rope_2d.py, in place) + attention, attention alone, BLOCK_M 64/128.
Floor: useful FLOPs at the bf16 matmul ceiling measured in this run (8192^3 torch matmul).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, record
from pixtral_rt.kernels import vision_attention as va
from pixtral_rt.kernels.rope_2d import rope_2d_

H, D = 16, 64
CASES = {
    "4img_4096_2048_1024_1024": [(64, 64), (32, 64), (32, 32), (32, 32)],
    "1img_4096": [(64, 64)],
    "16img_256": [(16, 16)] * 16,
}


def matmul_ceiling_tflops() -> float:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    ms = bench_ms(lambda: x @ y)
    return 2 * 8192 ** 3 / ms / 1e9


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

        # ---- ours
        qh, kh = q.clone(), k.clone()  # stand-ins for HF-permuted (half-layout) q/k: same cost
        variants = {}
        for bm_ in (128, 64):
            plan = va.plan_vision_attention(lens, bm_, device="cuda")
            variants[f"fused_half_bm{bm_}"] = (lambda plan=plan: va.vision_attention(
                qh, kh, v, cu, plan, pos, freqs, layout="half", out=out))
        plan = va.plan_vision_attention(lens, 128, device="cuda")
        variants["fused_interleaved_bm128"] = lambda: va.vision_attention(q, k, v, cu, plan, pos, freqs, out=out)
        qs, ks = q.clone(), k.clone()

        def separate():
            rope_2d_(qs, pos, freqs)
            rope_2d_(ks, pos, freqs)
            va.vision_attention(qs, ks, v, cu, plan, rope=False, out=out)
        variants["separate_rope_kernel+attn_bm128"] = separate
        variants["attention_only_no_rope_bm128"] = lambda: va.vision_attention(q, k, v, cu, plan, rope=False, out=out)
        ref_ms = base["sdpa_per_image"]
        for name, fn in variants.items():
            fn()  # autotune outside timing
            torch.cuda.synchronize()
            ms = bench_ms(fn)
            record("vision_attention", case, f"ours_{name}_useful_tflops", tf(ms), "TFLOP/s", "sdpa_per_image",
                   tf(ref_ms), floor_tflops, ms=ms, provider="ours_" + name,
                   flex_tflops=tf(base["flex_document_mask"]) if "flex_document_mask" in base else None)
        rope_only = bench_ms(lambda: (rope_2d_(qs, pos, freqs), rope_2d_(ks, pos, freqs)))
        record("vision_attention", case, "ours_rope_2d_kernel_only_qk_ms", rope_only, "ms", None, None, None)
    print("autotune choices:", json.dumps(va.best_config()))


if __name__ == "__main__":
    sys.exit(main())
