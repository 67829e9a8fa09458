"""Sweep of the vision attention's schedule options on the 4-image set (4096+2048+1024+1024 patches, 16 heads,
head_dim 64, bf16): what each buys, each one checked against an fp32 reference before it is timed.

Options (kernels/vision_attention.py): tile shape (BLOCK_M, BLOCK_N, warps, stages); EXP_EMU (0: every score's
exp on the special-function unit; 1: half of every tile's on the FMA pipe; 2: half of every other tile's);
KV_DESC (K / V tiles through TMA descriptors); WARP_SPEC (Triton's automatic warp specialisation of the key
loop); and where the RoPE runs: "qk_pass" (q and k rotated by kernels/rope_2d.py, then attention) or
"k_pass" (k rotated by rope_2d, q inside the attention kernel, once per program).

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
from pixtral_rt.kernels.rope_2d import rope_2d_, rope_2d_qk_
from pixtral_rt.reference.rope import apply_rope, vision_rope_angles

H, D, THETA = 16, 64, 10000.0
GRIDS = [(64, 64), (32, 64), (32, 32), (32, 32)]
CASE = "4img_4096_2048_1024_1024"

# (BLOCK_M, BLOCK_N, warps, stages)
SHAPES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3)]
QUICK_SHAPES = [(128, 64, 8, 3), (128, 128, 8, 3)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two tile shapes only")
    ap.add_argument("--no-ws", action="store_true", help="skip the warp-specialised variants")
    ap.add_argument("--profile", metavar="JSON", help='run one variant 3 times, untimed (for ncu), e.g. '
                    '\'{"bm": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "EXP_EMU": 1}\'')
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
    k_heads = qkv.view(n, 3 * H, D)[:, H:2 * H]
    rope_passes = {"qk_pass": lambda: rope_2d_qk_(qkv, pos, freqs, H),
                   "k_pass": lambda: rope_2d_(k_heads, pos, freqs)}
    rope_ms = {name: bench_ms(fn) for name, fn in rope_passes.items()}
    for name, ms in rope_ms.items():
        nbytes = (2 if name == "qk_pass" else 1) * 2 * n * H * D * 2
        record("vision_attention_sweep", CASE, f"rope_{name}_ms", ms, "ms", None, None,
               nbytes / copy_tbps / 1e9, gbps=nbytes / ms / 1e6)

    shapes = QUICK_SHAPES if args.quick else SHAPES
    variants = []
    for bm, bn, w, s in shapes:                          # every option on each tile shape, RoPE as a q+k pass
        for emu in (0, 1, 2):
            for desc in (False, True):
                variants.append((bm, dict(BLOCK_N=bn, num_warps=w, num_stages=s, EXP_EMU=emu, KV_DESC=desc),
                                 "qk_pass"))
    for bm, bn, w, s in shapes[:2]:                      # q rotated inside the kernel, k by a pass of its own
        for emu in (0, 1):
            variants.append((bm, dict(BLOCK_N=bn, num_warps=w, num_stages=s, EXP_EMU=emu, KV_DESC=False), "k_pass"))
    if not args.no_ws:
        for emu in (0, 1):
            variants.append((128, dict(BLOCK_N=64, num_warps=8, num_stages=3, EXP_EMU=emu, KV_DESC=True,
                                       WARP_SPEC=True), "qk_pass"))
    plans = {bm: va.plan_vision_attention(lens, bm, device="cuda") for bm in (64, 128)}
    results = []
    for bm, cfg, rope in variants:
        name = (f"bm{bm}_bn{cfg['BLOCK_N']}_w{cfg['num_warps']}_s{cfg['num_stages']}_emu{cfg['EXP_EMU']}"
                f"{'_tma' if cfg['KV_DESC'] else ''}{'_ws' if cfg.get('WARP_SPEC') else ''}_{rope}")
        mode = False if rope == "qk_pass" else "q"
        call = (lambda bm=bm, cfg=cfg, mode=mode: va.vision_attention(qv, kv, vv, cu, plans[bm], pos, freqs,
                                                                       rope=mode, out=out, config=cfg))
        try:
            qkv.copy_(qkv0)
            rope_passes[rope]()
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
        total_ms = bench_ms(lambda: (rope_passes[rope](), call()))
        results.append((tf(total_ms), name, attn_ms, total_ms))
        record("vision_attention_sweep", CASE, f"{name}_with_rope_useful_tflops", tf(total_ms), "TFLOP/s",
               "sdpa_per_image", tf(sdpa_ms), ceiling, ms=total_ms, attention_ms=attn_ms,
               attention_tflops=tf(attn_ms), err=err, sdpa_err=sdpa_err)
    print("\n== best 8 (RoPE + attention)")
    for t, name, a, tot in sorted(results, reverse=True)[:8]:
        print(f"  {name:48s} {t:6.1f} TFLOP/s  (attention {a * 1e3:6.1f} us = {tf(a):6.1f}; total {tot * 1e3:6.1f} us)")
    print(json.dumps({"sdpa_per_image_tflops": tf(sdpa_ms), "rope_ms": rope_ms}))


def profile(spec: dict) -> None:
    """One variant, three launches, nothing else on the GPU between them (for ncu -k _vision_attention)."""
    lens = [r * c for r, c in GRIDS]
    n = sum(lens)
    q, k, v = (torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.zeros(n, 2, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    spec = dict(spec)
    plan = va.plan_vision_attention(lens, spec.pop("bm", 128), device="cuda")
    rope = spec.pop("rope", False)
    for _ in range(3):
        va.vision_attention(q, k, v, cu, plan, pos, va.rope_pair_freqs(D, THETA, "cuda"), rope=rope, config=spec)
    torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
