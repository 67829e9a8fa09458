"""Sweep of the vision attention's schedule options on the 4-image set (4096+2048+1024+1024 patches, 16 heads,
head_dim 64, bf16): what each buys, each one checked against an fp32 reference before it is timed.

Options (kernels/vision_attention.py): tile shape (BLOCK_M, BLOCK_N, warps, stages); KV_DESC (full K / V
tiles through TMA descriptors); a register cap (maxnreg, for more CTAs per SM). RoPE runs as the encoder runs
it: q and k rotated by one kernels/rope_2d.py pass, whose own tile options are swept too (tokens x heads per
program, warps). Options measured and then removed from the kernel (FMA-pipe exps, hand-pipelined scores,
warp specialisation, q RoPE in the kernel) are in results/vision_attention_sweep.jsonl and docs/NOTES.md.

Each line: useful TFLOP/s of attention alone and of RoPE + attention (the metric of issue 12), the error vs
the fp32 reference and SDPA-bf16's own error, the baseline (SDPA per image, measured in this run) and the
floor (useful FLOPs at the bf16 matmul rate measured in this run). Variants that fail to compile or exceed
the error bound are reported and not timed.
    python -m benchmarks.sweep_vision_attention [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, copy_bandwidth_TBps, matmul_TFLOPs, record
from pixtral_rt.kernels import vision_attention as va
from pixtral_rt.kernels.rope_2d import rope_2d_
from pixtral_rt.reference.rope import apply_rope, vision_rope_angles

H, D, THETA = 16, 64, 10000.0
GRIDS = [(64, 64), (32, 64), (32, 32), (32, 32)]
CASE = "4img_4096_2048_1024_1024"

# (BLOCK_M, BLOCK_N, warps, stages)
SHAPES = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3)]
QUICK_SHAPES = [(64, 128, 4, 3), (128, 64, 8, 3)]
ROPE_TILES = [(2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]   # (elements per program, warps)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two tile shapes only")
    ap.add_argument("--configs", metavar="JSON", help="variants to run instead of the default grid: a list of "
                    "[BLOCK_M, BLOCK_N, warps, stages, KV_DESC, maxnreg or null]")
    ap.add_argument("--profile", metavar="JSON", help='run one variant 3 times, untimed (for ncu), e.g. '
                    '\'{"bm": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "KV_DESC": true}\'')
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.profile:
        return profile(json.loads(args.profile))
    ceiling = matmul_TFLOPs()
    copy_tbps = copy_bandwidth_TBps()
    lens = [r * c for r, c in GRIDS]
    n = sum(lens)
    flops = va.useful_flops(lens, H, D)
    tf = lambda ms: flops / ms / 1e9  # noqa: E731
    q, k, v = (torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.cat([torch.stack([torch.arange(r).repeat_interleave(c), torch.arange(c).repeat(r)], -1)
                     for r, c in GRIDS]).to(device="cuda", dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    bounds = cu.tolist()
    freqs = va.rope_pair_freqs(D, THETA, "cuda")

    # fp32 reference and SDPA-bf16's own error
    ang = vision_rope_angles(pos.long(), D, THETA)
    qr32, kr32 = apply_rope(q.float(), ang), apply_rope(k.float(), ang)

    def per_image(qq, kk, vv):
        return torch.cat([F.scaled_dot_product_attention(qq[a:b].transpose(0, 1), kk[a:b].transpose(0, 1),
                                                         vv[a:b].transpose(0, 1)).transpose(0, 1)
                          for a, b in zip(bounds[:-1], bounds[1:])])
    ref = per_image(qr32, kr32, v.float())
    qrb, krb = apply_rope(q, ang), apply_rope(k, ang)
    sdpa_err = rel(per_image(qrb, krb, v), ref)
    bound = 2 * sdpa_err + 1e-4
    print(f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s; SDPA-bf16 error {sdpa_err:.2e} (bound {bound:.2e})")

    qt, kt, vt = (t.transpose(0, 1)[None] for t in (qrb, krb, v))
    sdpa_ms = bench_ms(lambda: [F.scaled_dot_product_attention(qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b])
                                for a, b in zip(bounds[:-1], bounds[1:])])
    record("vision_attention_sweep", CASE, "sdpa_per_image_useful_tflops", tf(sdpa_ms), "TFLOP/s", None, None,
           ceiling, ms=sdpa_ms)

    qkv0 = torch.stack([q, k, v], 1)                      # (N, 3, H, D), as the encoder's QKV GEMM writes it
    qkv = qkv0.clone()
    out = torch.empty_like(q)
    qv, kv, vv = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    qk_heads = qkv.view(n, 3 * H, D)[:, :2 * H]
    rope_bytes = 2 * 2 * n * H * D * 2
    rope_ms = {}
    for elems, warps in ROPE_TILES:
        rope_ms[(elems, warps)] = ms = bench_ms(lambda: rope_2d_(qk_heads, pos, freqs, tile_elems=elems,
                                                                  num_warps=warps))
        record("vision_attention_sweep", CASE, f"rope_qk_pass_t{elems}_w{warps}_ms", ms, "ms", None, None,
               rope_bytes / copy_tbps / 1e9, gbps=rope_bytes / ms / 1e6)
    elems, warps = min(rope_ms, key=rope_ms.get)
    print(f"RoPE pass: best tile {elems} elements, {warps} warps: {rope_ms[(elems, warps)] * 1e3:.1f} us")
    rope_pass = (lambda: rope_2d_(qk_heads, pos, freqs, tile_elems=elems, num_warps=warps))

    shapes = QUICK_SHAPES if args.quick else SHAPES
    variants = [(bm, dict(BLOCK_N=bn, num_warps=w, num_stages=st, KV_DESC=desc))
                for bm, bn, w, st in shapes for desc in (False, True)]
    if args.configs:
        variants = [(bm, dict(BLOCK_N=bn, num_warps=w, num_stages=st, KV_DESC=bool(desc),
                              **({"maxnreg": nreg} if nreg else {})))
                    for bm, bn, w, st, desc, nreg in json.loads(args.configs)]
    plans = {bm: va.plan_vision_attention(lens, bm, device="cuda") for bm in (64, 128)}
    results = []
    for bm, cfg in variants:
        name = (f"bm{bm}_bn{cfg['BLOCK_N']}_w{cfg['num_warps']}_s{cfg['num_stages']}"
                f"{'_tma' if cfg['KV_DESC'] else ''}"
                f"{'_r%d' % cfg['maxnreg'] if 'maxnreg' in cfg else ''}")
        call = (lambda bm=bm, cfg=cfg: va.vision_attention(qv, kv, vv, cu, plans[bm], rope=False, out=out,
                                                            config=cfg))
        try:
            qkv.copy_(qkv0)
            rope_pass()
            out.fill_(float("nan"))
            call()
            torch.cuda.synchronize()
        except Exception as ex:  # noqa: BLE001
            print(f"{name}: failed: {type(ex).__name__}: {str(ex)[:300]}")
            continue
        err = rel(out, ref)
        nan = bool(torch.isnan(out).any())
        if nan or err > bound:
            print(f"{name}: WRONG (nan={nan}, err {err:.2e} > {bound:.2e}); not timed")
            record("vision_attention_sweep", CASE, f"{name}_error", err, "rel", "sdpa_bf16_error", sdpa_err, None,
                   wrong=True)
            continue
        attn_ms = bench_ms(call)
        total_ms = bench_ms(lambda: (rope_pass(), call()))
        results.append((tf(total_ms), name, attn_ms, total_ms))
        record("vision_attention_sweep", CASE, f"{name}_with_rope_useful_tflops", tf(total_ms), "TFLOP/s",
               "sdpa_per_image", tf(sdpa_ms), ceiling, ms=total_ms, attention_ms=attn_ms,
               attention_tflops=tf(attn_ms), err=err, sdpa_err=sdpa_err)
    print("\n== best 8 (RoPE + attention)")
    for t, name, a, tot in sorted(results, reverse=True)[:8]:
        print(f"  {name:48s} {t:6.1f} TFLOP/s  (attention {a * 1e3:6.1f} us = {tf(a):6.1f}; total {tot * 1e3:6.1f} us)")
    print(json.dumps({"sdpa_per_image_tflops": tf(sdpa_ms), "rope_ms": {str(k): v for k, v in rope_ms.items()}}))


def profile(spec: dict) -> None:
    """One variant, three launches, nothing else on the GPU between them (for ncu -k _vision_attention)."""
    lens = [r * c for r, c in GRIDS]
    n = sum(lens)
    q, k, v = (torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    spec = dict(spec)
    plan = va.plan_vision_attention(lens, spec.pop("bm", 128), device="cuda")
    for _ in range(3):
        va.vision_attention(q, k, v, cu, plan, rope=False, config=spec)
    torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
