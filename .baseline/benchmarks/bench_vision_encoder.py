"""Vision encoder (Pixtral-12B ViT, 24 layers, dim 1024, bf16): pixtral_rt.vision.FastVisionEncoder vs HF
transformers PixtralVisionModel with the same random weights (N(0, 0.02) for matrices, as
../shared/bench/hf_baseline.py), in ms (median of CUDA-event timings).

Cases: one 1024x1024 image (4096 patches); the 4-image set 1024^2, 512x768, 768x512, 256^2 (7424 patches).
Ours: eager, and a CUDA graph of the bucket (bucket = the pack's patch count rounded up to 256), RoPE of q
and k in one launch before attention (rope="separate", the default). Both include packing the images into patches.
Floor: 2 * params * patches (matmuls) + 4 * H * D * sum(n_i^2) * layers (attention) at the bf16 matmul
ceiling measured in this run. Also prints the relative difference of our output vs HF's.
"""
from __future__ import annotations

import sys

import torch

from benchmarks.common import matmul_TFLOPs, record
from pixtral_rt.config import PIXTRAL_12B
from pixtral_rt.vision import FastVisionEncoder, pack_patches

CASES = {"1img_1024x1024": [(1024, 1024)], "4img_1024sq_512x768_768x512_256sq": [(1024, 1024), (512, 768),
                                                                                   (768, 512), (256, 256)]}


def timed(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def hf_model():
    from transformers import PixtralVisionConfig, PixtralVisionModel
    vc = PixtralVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             head_dim=64, image_size=1024, patch_size=16, hidden_act="silu", rope_theta=10000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = PixtralVisionModel._from_config(vc, torch_dtype=torch.bfloat16)
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.02)
    return m


def hf_to_mistral(sd, n_heads=16):
    """HF PixtralVisionModel state dict -> Mistral names, q/k rows un-permuted (interleaved RoPE)."""
    ren = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1", "up_proj": "w3",
           "down_proj": "w2"}
    out = {}
    for k, t in sd.items():
        for a, b in ren.items():
            k = k.replace(f".{a}.", f".{b}.")
        if k.endswith(("attention.wq.weight", "attention.wk.weight")):
            o, i = t.shape
            t = t.view(n_heads, 2, o // n_heads // 2, i).transpose(1, 2).reshape(o, i)
        out[k] = t
    return out


def main():
    ceiling = matmul_TFLOPs()
    v = PIXTRAL_12B.vision
    hf = hf_model()
    sd = hf_to_mistral(hf.state_dict())
    # rope="fused" (cos/sin per key tile, measured 19.6 / 28.6 ms on the H200) is left out: compile time
    encs = {r: FastVisionEncoder.from_state_dict(sd, v, dtype=torch.bfloat16, device="cuda", rope=r)
            for r in ("separate",)}
    params = sum(t.numel() for k, t in hf.state_dict().items() if t.dim() >= 2)
    for case, sizes in CASES.items():
        g = torch.Generator().manual_seed(1)
        imgs = [torch.randn(3, h, w, generator=g).to("cuda", torch.bfloat16) for h, w in sizes]
        grids = [(h // 16, w // 16) for h, w in sizes]
        lens = [r * c for r, c in grids]
        n = sum(lens)
        flops = 2 * params * n + 4 * 16 * 64 * sum(s * s for s in lens) * 24
        floor_ms = flops / ceiling / 1e9
        px = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes), device="cuda",
                         dtype=torch.bfloat16)
        for i, im in enumerate(imgs):
            px[i, :, :im.shape[1], :im.shape[2]] = im
        image_sizes = torch.tensor(sizes, device="cuda")
        with torch.inference_mode():
            hf_ms = timed(lambda: hf(px, image_sizes=image_sizes), iters=10)
            hf_out = hf(px, image_sizes=image_sizes).last_hidden_state[0].float()
        record("vision_encoder", case, "hf_PixtralVisionModel_ms", hf_ms, "ms", None, None, floor_ms,
               provider="hf", patches=n)
        bucket = (n + 255) // 256 * 256
        for rope, enc in encs.items():
            with torch.inference_mode():
                plan = enc.plan(grids)
                eager = lambda: enc.encode(pack_patches(imgs, 16), plan)  # noqa: E731
                out = eager().float()
                err = ((out - hf_out).norm() / hf_out.norm()).item()
                ms = timed(eager)
                record("vision_encoder", case, f"ours_eager_rope_{rope}_ms", ms, "ms", "hf_PixtralVisionModel",
                       hf_ms, floor_ms, provider=f"ours_eager_{rope}", patches=n, rel_diff_vs_hf=err)
                graph = enc.capture(bucket, 8, encode_only=True)
                gplan = enc.plan(grids, bucket=bucket, max_images=8)
                run = lambda: graph(pack_patches(imgs, 16), gplan)  # noqa: E731
                gout = run().float()
                gerr = ((gout - hf_out).norm() / hf_out.norm()).item()
                ms = timed(run)
                record("vision_encoder", case, f"ours_graph_rope_{rope}_ms", ms, "ms", "hf_PixtralVisionModel",
                       hf_ms, floor_ms, provider=f"ours_graph_{rope}", patches=n, bucket=bucket,
                       rel_diff_vs_hf=gerr)
    # where the time goes (one layer's pieces, 4-image set, graph-free), for the closing note
    try:
        from torch.profiler import ProfilerActivity, profile
        enc = encs["separate"]
        sizes = CASES["4img_1024sq_512x768_768x512_256sq"]
        grids = [(h // 16, w // 16) for h, w in sizes]
        plan = enc.plan(grids)
        patches = torch.randn(sum(r * c for r, c in grids), 768, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            enc.encode(patches, plan)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                enc.encode(patches, plan)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    except Exception as ex:  # noqa: BLE001
        print("profile failed", repr(ex)[:200])


if __name__ == "__main__":
    sys.exit(main())
