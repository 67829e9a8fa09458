"""Image preprocessing: a 4000x3000 JPEG photo and a 1024x1024 PNG, decoded once, then resize + normalise by
  - mistral_common's transform_image (OpenCV INTER_CUBIC on float + NumPy normalise): the baseline,
  - the NumPy fallback, the C++ op (pixtral_rt._C, all cores), and the CUDA op (pixtral_rt._C_cuda) with
    the pixels already on the GPU (device time, CUDA events) and including the host->device upload.
Floor for the CUDA op: bytes moved (uint8 in + float32 out) / HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
Also checks that every backend agrees with mistral_common (max abs error) and prints it.

    python benchmarks/bench_preprocess.py [--quick]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import record  # noqa: E402
from pixtral_rt import preprocess as pp  # noqa: E402
from pixtral_rt.config import PIXTRAL_12B  # noqa: E402
from pixtral_rt.images import load_image  # noqa: E402

HBM_BYTES_PER_S = 3.35e12


def _photo(w, h, fmt):
    """A smooth synthetic photo-like image (gradients + noise), encoded as `fmt`."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(img).save(b, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return b.getvalue()


def _cpu_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    reps = 3 if a.quick else 10
    try:
        from mistral_common.tokens.tokenizers.image import transform_image
    except ImportError:  # the GPU machine may lack it: the fallback is then the reference, no baseline
        transform_image = None
    cases = [("4000x3000 JPEG photo", _photo(4000, 3000, "JPEG")), ("1024x1024 PNG", _photo(1024, 1024, "PNG"))]
    print(pp.backend_info(), "| CUDA op:", pp.cuda_backend())
    for name, data in cases:
        t = time.perf_counter()
        pixels = load_image(data)
        decode_ms = (time.perf_counter() - t) * 1e3
        h, w, _ = pixels.shape
        plan = pp.plan_image(w, h, PIXTRAL_12B.vision)
        out_hw = (plan.out_height, plan.out_width)
        pil = Image.fromarray(pixels)
        print(f"{name}: decode {decode_ms:.1f} ms (Pillow, not in the figures below), -> {out_hw[1]}x{out_hw[0]}")
        if transform_image is not None:
            ref = transform_image(pil, (plan.out_width, plan.out_height))
            base = _cpu_ms(lambda: transform_image(pil, (plan.out_width, plan.out_height)), reps)
            record("preprocess", name, "mistral_common_ms", base, "ms", None, None, None)
        else:
            print("mistral_common not installed: errors are vs the NumPy fallback, no baseline")
            ref, base = pp.preprocess(pixels, out_hw, use="numpy"), None
        ms = _cpu_ms(lambda: pp.preprocess(pixels, out_hw, use="numpy"), reps)
        err = float(np.abs(pp.preprocess(pixels, out_hw, use="numpy") - ref).max())
        bname = "mistral_common" if base else None
        record("preprocess", name, "numpy_fallback_ms", ms, "ms", bname, base, None, max_abs_err=err)
        if pp._C is not None:
            ms = _cpu_ms(lambda: pp.preprocess(pixels, out_hw, use="cpp"), reps)
            err = float(np.abs(pp.preprocess(pixels, out_hw, use="cpp") - ref).max())
            record("preprocess", name, "cpp_op_ms", ms, "ms", bname, base, None, max_abs_err=err,
                   threads=pp._C.num_threads())
        try:
            import torch
            cuda = torch.cuda.is_available() and pp._load_cuda() is not None
        except Exception:  # noqa: BLE001
            cuda = False
        if cuda:
            from benchmarks.common import bench_ms
            dev = torch.from_numpy(pixels.copy()).cuda()
            out = torch.empty((3, *out_hw), device="cuda")
            got = pp.preprocess_cuda(dev, out_hw, out=out)
            err = float((got.cpu() - torch.from_numpy(ref)).abs().max())
            bw = 4.8e12 if "H200" in torch.cuda.get_device_name(0) else HBM_BYTES_PER_S
            floor = (pixels.nbytes + out.numel() * 4) / bw * 1e3
            ms = bench_ms(lambda: pp.preprocess_cuda(dev, out_hw, out=out))
            record("preprocess", name, "cuda_op_device_ms", ms, "ms", bname, base, floor, max_abs_err=err)
            pinned = torch.from_numpy(pixels.copy()).pin_memory()
            ms = bench_ms(lambda: pp.preprocess_cuda(pinned, out_hw, out=out, device="cuda"))
            record("preprocess", name, "cuda_op_with_upload_ms", ms, "ms", bname, base, floor)
        else:
            print(f"{name}: CUDA op not measured (no GPU or pixtral_rt._C_cuda not built)")


if __name__ == "__main__":
    main()
