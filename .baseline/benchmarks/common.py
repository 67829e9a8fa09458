"""Shared benchmark plumbing: device name, commit, timing, and the results JSON-lines writer.

Every measurement becomes one JSON line in benchmarks/results/<bench>.jsonl with at least:
bench, case, metric, value, unit, baseline, baseline_value, floor, device, date, commit, command.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def commit() -> str:
    env = os.environ.get("PIXTRAL_RT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def record(bench: str, case: str, metric: str, value: float, unit: str, baseline: str | None,
           baseline_value: float | None, floor: float | None, **extra) -> dict:
    """Print one measurement as a table row and append it as a JSON line (also to $OUT if set)."""
    row = {
        "bench": bench, "case": case, "metric": metric, "value": round(float(value), 4), "unit": unit,
        "baseline": baseline, "baseline_value": None if baseline_value is None else round(float(baseline_value), 4),
        "floor": None if floor is None else round(float(floor), 4), "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
        "command": "python " + " ".join(sys.argv), **extra,
    }
    ratio = ""
    if baseline_value:
        ratio = f"  ratio {float(value) / float(baseline_value):.2f}x vs {baseline}"
    print(f"[{bench}] {case:<40} {metric} = {float(value):.4g} {unit}{ratio}"
          + (f"  floor {float(floor):.4g}" if floor is not None else "") + f"  ({row['device']})", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row) + "\n"
    with open(RESULTS_DIR / f"{bench}.jsonl", "a") as f:
        f.write(line)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / f"{bench}.jsonl", "a") as f:
            f.write(line)
    return row


def copy_bandwidth_TBps(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    import torch
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    tb = 2 * nbytes / bench_ms(lambda: b.copy_(a)) / 1e9
    del a, b
    return tb


def matmul_TFLOPs(n: int = 8192) -> float:
    """Measured bf16 n x n x n matmul rate in TFLOP/s on random data."""
    import torch
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    return 2 * n ** 3 / bench_ms(lambda: x @ y) / 1e9


def bench_ms(fn, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events via triton.testing.do_bench)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def median_wall_ms(fn, reps: int = 15, warmup: int = 1, sync=None) -> float:
    """Median wall-clock milliseconds of fn() (host work included), after `warmup` calls; sync (e.g.
    torch.cuda.synchronize) runs after the warm-up and inside each timed call."""
    import time
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def photo_like_jpeg(h: int, w: int, rng, quality: int = 90, subsampling: int = -1) -> bytes:
    """A random h x w JPEG that compresses and decodes like a photo (smooth content plus mild noise, not white
    noise). subsampling: Pillow's (-1 default = 4:2:0, 0 = 4:4:4)."""
    import io

    import numpy as np
    from PIL import Image
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
    px = np.clip(base + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()
