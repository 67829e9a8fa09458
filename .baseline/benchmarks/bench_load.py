"""Loading a full-size checkpoint onto the GPU: wall time and peak host RSS (the loader memory-maps and
places each tensor straight on the device, so RSS must stay far below the checkpoint size), then the
reference model in bf16 against HF transformers in bf16 on the same weights (logit error).

    python -m pixtral_rt.random_weights /tmp/p12b --preset Pixtral-12B-2409 --device cuda
    python benchmarks/bench_load.py --model /tmp/p12b
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from benchmarks.common import record


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    from pixtral_rt.checkpoint import load_state_dict, plan_checkpoint

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (ru_maxrss is KiB on Linux)
    t0 = time.perf_counter()
    plan = plan_checkpoint(a.model)
    sd = load_state_dict(plan, device="cuda", dtype=torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    ckpt_gb = sum(f.stat().st_size for f in plan.files) / 1e9
    print(plan.describe())
    record("load", plan.args.name, "load_wall", load_s, "s", None, None, None, checkpoint_GB=round(ckpt_gb, 2))
    record("load", plan.args.name, "peak_host_rss", rss, "GB", "checkpoint_size", ckpt_gb, None,
           rss_before_load_GB=round(rss0, 2))
    if a.skip_hf:
        return
    from pixtral_rt.reference.model import PixtralModel
    from benchmarks.bench_e2e import build_hf
    args = plan.args
    with torch.device("meta"):
        ref = PixtralModel(args)
    ref.load_state_dict(sd, assign=True, strict=True)
    ref.eval()
    hf = build_hf(dict(sd), args)
    rng = np.random.default_rng(0)
    p = args.vision.patch_size
    grids = [(32, 32), (7, 13)]
    images = [torch.tensor(rng.standard_normal((3, r * p, c * p)), dtype=torch.float32, device="cuda")
              for r, c in grids]
    toks = [1, 3]
    for r, c in grids:
        row = [args.vision.image_token_id] * c + [args.vision.image_break_token_id]
        img = row * r
        img[-1] = args.vision.image_end_token_id
        toks += img
    toks += rng.integers(1000, 100000, 30).tolist() + [4]
    with torch.inference_mode():
        ours = ref.forward_tokens(torch.tensor(toks, device="cuda"), images).float()
        H = max(i.shape[1] for i in images)
        W = max(i.shape[2] for i in images)
        px = torch.zeros(len(images), 3, H, W, device="cuda", dtype=torch.bfloat16)
        for i, im in enumerate(images):
            px[i, :, :im.shape[1], :im.shape[2]] = im
        sizes = torch.tensor([[i.shape[1], i.shape[2]] for i in images], device="cuda")
        theirs = hf(input_ids=torch.tensor([toks], device="cuda"), pixel_values=px, image_sizes=sizes).logits[0].float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    mx = (ours - theirs).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    record("load", args.name, "logits_rel_err_reference_bf16_vs_hf_bf16", rel, "ratio", None, None, None,
           max_abs_err=round(mx, 4), logit_std=round(theirs.std().item(), 4), argmax_agreement=round(agree, 4),
           prompt_tokens=len(toks))


if __name__ == "__main__":
    main()
