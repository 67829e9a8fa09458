"""Row counts the vision encoder runs at (issue 12: nothing captured at request time, little padding).

A request's images are packed into N patch rows. Up to one full-size image (image_size / patch_size squared
patches: 4096 for Pixtral-12B) the encoder replays the CUDA graph of the smallest bucket >= N; the graphs
are all captured at load. Buckets grow by at most MAX_PADDING, so a bucket holds at most 12% padding rows
for every N >= MIN_BUCKET:
    b[0] = MIN_BUCKET,  b[k+1] = floor((b[k] + 1) * (1 + MAX_PADDING) / ROW_ALIGN) * ROW_ALIGN
(the worst case is N = b[k] + 1 in bucket b[k+1]). Below MIN_BUCKET rows every GEMM of the encoder is one
partial wave of 128-row tiles over the SMs, so 256 rows cost what 16 do (measured in
benchmarks/bench_vision_buckets.py).
Above one full-size image the encoder runs eagerly, without a graph, on N rounded up to ROW_ALIGN rows: its
GPU time (>= 10 ms) hides the host's kernel launches, and it pays no padding. Eager runs use the same
kernels and the same plan shapes (padded to ROW_ALIGN) as the graphs, so they compile nothing new either.
"""
from __future__ import annotations

from .config import VisionEncoderArgs

MIN_BUCKET = 256
MAX_PADDING = 0.12
ROW_ALIGN = 16


def full_image_patches(v: VisionEncoderArgs) -> int:
    side = v.image_size // v.patch_size
    return side * side


def graph_buckets(v: VisionEncoderArgs, top: int | None = None) -> list[int]:
    """Graph buckets up to `top` rows (default: one full-size image), ascending; the last one is `top`."""
    top = full_image_patches(v) if top is None else top
    top = -(-top // ROW_ALIGN) * ROW_ALIGN
    out = [min(MIN_BUCKET, top)]
    while out[-1] < top:
        nxt = int((out[-1] + 1) * (1 + MAX_PADDING)) // ROW_ALIGN * ROW_ALIGN
        out.append(min(max(nxt, out[-1] + ROW_ALIGN), top))
    return out


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The graph bucket for n rows, or None: run eagerly on eager_rows(n)."""
    if n <= 0:
        raise ValueError(f"a vision batch needs at least one patch, got {n}")
    for b in buckets:
        if b >= n:
            return b
    return None


def eager_rows(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN
