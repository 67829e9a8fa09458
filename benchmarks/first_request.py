"""First-request latency (issue 12): user-visible TTFT of a request, cold (the first request in a fresh
process, right after Engine.load) and warm (the same kind of request again, new pixels each time so that no
cache can serve it), for the cases of performance.md:
  a_1img_1024     one 1024x1024 image + ~30 text tokens
  b_4imgs_mixed   1024^2 + 512x768 + 768x512 + 256^2 (7424 patches)
  c_2imgs_odd     37x1500 + 640x480 (an odd-size pair)
Floor: the request's matmul + attention FLOPs (bench_e2e.ttft_flops) at the bf16 matmul rate measured by the
parent in the same run (host work not counted).
User-visible TTFT: wall clock from the call of Engine.stream (the CLI's engine) to the first token, host work
included: the images are JPEG files on disk (quality 90, as a user passes them), opened, decoded, planned
and tokenised inside the timed call. Each case runs in its own fresh process (the parent spawns
`python -m benchmarks.first_request --child CASE`), which also reports its load + warm-up time, what the
warm-up prepared, and the compile / autotune / capture counters across the cold request.

    python -m benchmarks.bench_e2e --first-request [--random-weights Pixtral-12B-2409 | --model DIR]
    python -m benchmarks.first_request --processes 5 --cases a_1img_1024,b_4imgs_mixed   # the spread across
                                                                  # fresh processes (max / min warm TTFT)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {"a_1img_1024": [(1024, 1024)],
         "b_4imgs_mixed": [(1024, 1024), (512, 768), (768, 512), (256, 256)],
         "c_2imgs_odd": [(37, 1500), (640, 480)]}          # (height, width)
TEXT = " ".join(["describe the picture in detail please"] * 5)  # ~30 tokens
# targets (performance.md, H200): cold <= 1.15x warm; user-visible 1 image <= 150 ms, 4 images <= 300 ms
TARGET_MS = {"a_1img_1024": 150.0, "b_4imgs_mixed": 300.0}


def _images(folder: Path, sizes, seed: int) -> list[str]:
    """Random-content JPEG files (photo-like: benchmarks.common.photo_like_jpeg)."""
    from benchmarks.common import photo_like_jpeg
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"img_{seed}_{i}.jpg"
        p.write_bytes(photo_like_jpeg(h, w, rng))
        paths.append(str(p))
    return paths


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def child(a) -> None:
    import torch

    from pixtral_rt import compile_events
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    from pixtral_rt.engine import Engine
    from pixtral_rt.sampling import SamplingParams
    sizes = CASES[a.child]
    tmp = Path(tempfile.mkdtemp(prefix="pixtral_rt_first_"))
    files = [_images(tmp, sizes, seed) for seed in range(a.reps + 1)]    # new pixels for every request
    t0 = time.perf_counter()
    eng = Engine.load(a.model, random_weights=a.random_weights, max_context=a.max_context, progress=False)
    sync()
    load_s = time.perf_counter() - t0
    ttft, enc, events = [], [], []
    for k, paths in enumerate(files):
        msgs = [{"role": "user", "content": [{"type": "image", "image": p} for p in paths]
                 + [{"type": "text", "text": TEXT}]}]
        before = compile_events.snapshot()
        t = time.perf_counter()
        first = None
        for _piece in eng.stream(msgs, SamplingParams(max_tokens=4, temperature=0.0)):
            if first is None:
                first = time.perf_counter()
        sync()
        r = eng.last
        # the engine's own stamp: from the call to the first token (a piece can wait for more tokens)
        ttft.append(r.timings.get("ttft_ms", ((first or time.perf_counter()) - t) * 1e3))
        enc.append(r.timings.get("encode_ms", float("nan")))
        after = compile_events.snapshot()
        events.append({k2: after[k2] - before[k2] for k2 in after})
        if k == 0:
            cold_compiled = compile_events.recent(max(0, events[0]["triton_compile"]))
    from benchmarks.bench_e2e import ttft_flops
    flops = ttft_flops(eng.args, eng.encode(msgs, SamplingParams(max_tokens=4)))   # the last request's shape
    out = {"case": a.child, "load_s": load_s, "warmup": eng.info.get("warmup", {}), "ttft_flops": flops,
           "cold_ms": ttft[0], "warm_ms": float(np.median(ttft[1:])), "warm_all_ms": ttft[1:],
           "cold_encode_ms": enc[0], "warm_encode_ms": float(np.median(enc[1:])),
           "cold_events": events[0], "warm_events": events[1:], "cold_compiled": cold_compiled,
           "patches": r.image_patches, "prompt_tokens": r.prompt_tokens, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print("RESULT " + json.dumps(out), flush=True)
    eng.shutdown()


def run(model: str | None, random_weights: str | None, cases: list[str], reps: int, max_context: int,
        processes: int = 1) -> list[dict]:
    """Each case in `processes` fresh processes; record cold and warm user-visible TTFT (cold's baseline: warm)
    of each, and with several processes the spread of the warm TTFT across them (issue 21: some processes ran
    the same request 1.6x slower than others)."""
    from benchmarks.common import record
    rate = None
    if _has_cuda():            # the bf16 matmul rate of this GPU, measured before the children start
        from benchmarks.common import matmul_TFLOPs
        rate = matmul_TFLOPs() * 1e12
        print(f"bf16 matmul {rate / 1e12:.0f} TFLOP/s (floor = the request's matmul + attention FLOPs at it)")
    results = []
    for case in [c for c in cases for _ in range(processes)]:
        cmd = [sys.executable, "-m", "benchmarks.first_request", "--child", case, "--reps", str(reps),
               "--max-context", str(max_context)]
        cmd += ["--model", model] if model else []
        cmd += ["--random-weights", random_weights] if random_weights else []
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"[first_request] {case} failed (rc {p.returncode}):\n{p.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(line[-1][7:])
        res["process_s"] = time.perf_counter() - t
        results.append(res)
        extra = dict(patches=res["patches"], prompt_tokens=res["prompt_tokens"], load_s=round(res["load_s"], 2),
                     warmup=res["warmup"], cold_events=res["cold_events"], cold_compiled=res["cold_compiled"][:8],
                     encode_ms_cold=round(res["cold_encode_ms"], 2), encode_ms_warm=round(res["warm_encode_ms"], 2),
                     images="jpeg files q90", fresh_process=True)
        floor = res["ttft_flops"] / rate * 1e3 if rate else None
        extra["ttft_TFLOP"] = round(res["ttft_flops"] / 1e12, 2)
        record("first_request", case, "user_ttft_cold_ms", res["cold_ms"], "ms", "same_case_warm", res["warm_ms"],
               floor, target_ratio=1.15, **extra)
        record("first_request", case, "user_ttft_warm_ms", res["warm_ms"], "ms", None, None, floor,
               target_ms=TARGET_MS.get(case), warm_all_ms=[round(x, 2) for x in res["warm_all_ms"]],
               encode_ms=round(res["warm_encode_ms"], 2), patches=res["patches"])
    for case in cases if processes > 1 else []:
        mine = [r for r in results if r["case"] == case]
        warm = [r["warm_ms"] for r in mine]
        if len(warm) > 1:
            floor = mine[0]["ttft_flops"] / rate * 1e3 if rate else None
            record("first_request", f"{case}@{len(warm)}_processes", "warm_ttft_max_over_min", max(warm) / min(warm),
                   "ratio", "1.0 (the same request in every fresh process)", 1.0, None, target_ratio=1.05,
                   warm_ms_per_process=[round(x, 2) for x in warm], min_ms=round(min(warm), 2),
                   max_ms=round(max(warm), 2), ttft_floor_ms=floor)
    if results:
        print(f"\n{'case':<16}{'load+warmup s':>14}{'cold ms':>10}{'warm ms':>10}{'cold/warm':>10}"
              f"{'encode ms':>10}  cold request compiled/tuned/captured")
        for r in results:
            ev = r["cold_events"]
            print(f"{r['case']:<16}{r['load_s']:>14.1f}{r['cold_ms']:>10.1f}{r['warm_ms']:>10.1f}"
                  f"{r['cold_ms'] / r['warm_ms']:>10.2f}{r['warm_encode_ms']:>10.1f}  "
                  f"{ev['triton_compile']}/{ev['autotune']}/{ev['graph_capture']} {r['cold_compiled'][:4]}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help="checkpoint folder (default: --random-weights)")
    ap.add_argument("--random-weights", default=None, help="preset drawn on the GPU (default Pixtral-12B-2409 "
                    "when --model is not given)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=3, help="warm requests after the cold one")
    ap.add_argument("--max-context", type=int, default=16384)
    ap.add_argument("--processes", type=int, default=1, help="fresh processes per case (> 1: also the spread of "
                    "the warm TTFT across them, max / min; target <= 1.05)")
    a = ap.parse_args()
    if not a.model and not a.random_weights:
        a.random_weights = "Pixtral-12B-2409"
    if a.child:
        child(a)
    else:
        run(a.model, a.random_weights, a.cases.split(","), a.reps, a.max_context, a.processes)


if __name__ == "__main__":
    main()
