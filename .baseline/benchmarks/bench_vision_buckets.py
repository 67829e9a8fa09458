"""Vision encoder time against the patch count (issue 12: padding waste, eager vs CUDA graph), random
Pixtral-12B vision weights (encoder + adapter), bf16, one H200.

For each pack of images it times, wall clock from the call to the synchronised result (host launch cost
included, as on the request path), median of 15:
  eager        the encoder on the real rows (no graph, no padding)
  graph_pow2   the CUDA graph of the power-of-two bucket (the engine's buckets before issue 12)
  graph_fine   the CUDA graph of the request's bucket in pixtral_rt.vision_buckets (the engine's buckets now)
and the engine's choice (pixtral_rt.vision_buckets.bucket_for: a fine graph bucket, or eager above the
graph range). Baseline in the same run: graph_pow2. Floor: matmul + attention FLOPs at the bf16 matmul rate
measured in this run. The 1000x600 image (2394 patches) is also compared with its patch-proportional share
of the 1024x1024 time (target <= 1.1x).

    python -m benchmarks.bench_vision_buckets
"""
from __future__ import annotations

import functools

import torch

from benchmarks.common import matmul_TFLOPs, median_wall_ms, record
from pixtral_rt.config import PIXTRAL_12B

# (height, width) in pixels after preprocessing (multiples of 16)
CASES = {"1x1_patch": [(16, 16)], "256sq": [(256, 256)], "480x640": [(480, 640)], "512sq": [(512, 512)],
         "600x1000": [(608, 1008)], "768x1024": [(768, 1024)], "1024sq": [(1024, 1024)],
         "odd_pair_32x1024+480x640": [(32, 1024), (480, 640)],
         "4imgs_mixed": [(1024, 1024), (512, 768), (768, 512), (256, 256)],
         "3x1024sq": [(1024, 1024)] * 3, "6x1024sq": [(1024, 1024)] * 6}


def vision_bucket(n: int, minimum: int = 256) -> int:
    """The engine's buckets before issue 12: the patch count rounded up to a power of two (>= 256)."""
    b = minimum
    while b < n:
        b *= 2
    return b


# wall clock to the synchronised result, after 3 warm-up calls, median of 15
timed = functools.partial(median_wall_ms, reps=15, warmup=3, sync=torch.cuda.synchronize)


def main() -> None:
    from pixtral_rt.random_weights import expected_shapes, random_state_dict_on_device
    from pixtral_rt.vision import FastVisionEncoder
    from pixtral_rt.vision_buckets import bucket_for, graph_buckets
    args = PIXTRAL_12B
    v = args.vision
    rate = matmul_TFLOPs() * 1e12
    sd = random_state_dict_on_device(args, progress=False, keys=[k for k in expected_shapes(args) if k.startswith(
        ("vision_encoder.", "vision_language_adapter."))])
    enc = FastVisionEncoder.from_state_dict(sd, args, torch.bfloat16, "cuda")
    del sd
    max_images = 12
    buckets = graph_buckets(v)
    params = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size) \
        + 3 * v.patch_size ** 2 * v.hidden_size + v.hidden_size * args.text.dim + args.text.dim ** 2
    g = torch.Generator(device="cuda").manual_seed(0)
    times = {}
    for case, sizes in CASES.items():
        grids = [(h // 16, w // 16) for h, w in sizes]
        lens = [r * c for r, c in grids]
        n = sum(lens)
        flops = 2 * params * n + 4 * v.hidden_size * sum(x * x for x in lens) * v.num_hidden_layers
        floor = flops / rate * 1e3
        patches = torch.randn(n, 3 * 16 * 16, device="cuda", generator=g)
        out = {}
        with torch.inference_mode():
            plan = enc.plan(grids)
            out["eager"] = timed(lambda: enc(patches, plan))
            pb = vision_bucket(n)
            gp = enc.capture(pb, max_images)
            pplan = enc.plan(grids, bucket=pb, max_images=max_images)
            out["graph_pow2"] = timed(lambda: gp(patches, pplan))
            fb = bucket_for(n, buckets)
            if fb is not None:
                gf = enc.capture(fb, max_images)
                fplan = enc.plan(grids, bucket=fb, max_images=max_images)
                out["graph_fine"] = timed(lambda: gf(patches, fplan))
                ref = gp(patches, pplan).float()
                got = gf(patches, fplan).float()
                err = ((got - ref).norm() / ref.norm()).item()
            else:
                err = None
        chosen = out["graph_fine"] if fb is not None else out["eager"]
        times[case] = (n, chosen)
        for k, ms in out.items():
            record("vision_buckets", case, f"{k}_ms", ms, "ms", "graph_pow2", out["graph_pow2"], floor, patches=n,
                   pow2_bucket=pb, fine_bucket=fb, rows=n if k == "eager" else (pb if k == "graph_pow2" else fb),
                   fine_vs_pow2_rel_diff=err)
        record("vision_buckets", case, "engine_choice_ms", chosen, "ms", "graph_pow2", out["graph_pow2"], floor,
               patches=n, choice="eager" if fb is None else f"graph_{fb}", padding_rows=0 if fb is None else fb - n)
    n1, t1 = times["1024sq"]
    n6, t6 = times["600x1000"]
    share = t1 * n6 / n1
    record("vision_buckets", "600x1000_vs_share_of_1024sq", "time_over_share", t6 / share, "x",
           "patch_proportional_share_of_1024sq_ms", share, None, target=1.1, patches=n6)
    print(f"\n{'case':<28}{'patches':>8}{'engine ms':>10}")
    for case, (n, ms) in times.items():
        print(f"{case:<28}{n:>8}{ms:>10.2f}")


if __name__ == "__main__":
    main()
