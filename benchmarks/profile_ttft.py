"""Where one request's TTFT goes, from a torch.profiler trace (CPU + CUDA activities), for any tree of this
project: run it from the tree to profile (its `pixtral_rt` on PYTHONPATH), e.g. the current tree and an older
one carried along, same machine, same call (issue 20: 1k-token text TTFT of the one engine vs 975fe1b).

Per request (a fresh prompt of N random text tokens each time, max_tokens=1, so the profiled window holds
the prefill and the first token only):
  host_before_gpu_ms   the call -> the first kernel starts on the GPU (encode, queue, plan, uploads, launches)
  gpu_span_ms          first kernel start -> last kernel end
  gpu_busy_ms          the union of kernel intervals inside the span (span - busy = the GPU idle, waiting for
                       the host)
  after_gpu_ms         last kernel end -> the call returns the first token (copy back, hand-off to the caller)
  kernels              kernels launched for the request
and the GPU time per kernel name (top ones), so two trees' prefill kernels can be compared line by line.
Unprofiled TTFT (median of --reps, the engine's own ttft_ms) is printed first: the profiler slows launches.

    PYTHONPATH=$PWD python benchmarks/profile_ttft.py --random-weights Pixtral-12B-2409 [--tokens 1000]
    cd old_tree && PYTHONPATH=$PWD python ../benchmarks/profile_ttft.py --random-weights Pixtral-12B-2409 --backend fast

Writes `$OUT/profile_ttft_<tag>.json` (the per-request figures and kernel table) and a chrome trace of
the last profiled request (`--trace`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function


def text_request(EncodedRequest, n: int, rng):
    """n random text tokens ([BOS] [INST] ... [/INST]), built from the fields this tree's EncodedRequest has."""
    toks = [1, 3] + rng.integers(1000, 100000, n - 3).tolist() + [4]
    fields = {f.name for f in dataclasses.fields(EncodedRequest)}
    kw = dict(tokens=toks, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0], prompt_tokens=n)
    return EncodedRequest(**{k: v for k, v in kw.items() if k in fields})


def one(engine, SamplingParams, req, max_tokens: int) -> float:
    for _ in engine.stream(None, SamplingParams(max_tokens=max_tokens), req=req):
        pass
    return engine.last.timings["ttft_ms"]


def _union(intervals):
    total, end = 0.0, -1e30
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def analyse(prof, n_reqs: int) -> tuple[list[dict], dict]:
    evs = prof.events()
    CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    # the request windows are the host ranges of record_function. A record_function on the thread that
    # launches the kernels also shows up on the GPU timeline (a "gpu_user_annotation" spanning its kernels):
    # neither a window nor a kernel (counted as one, it filled every idle gap of the old batch-1 backend,
    # whose kernels are launched from the calling thread, and hid its launch gaps)
    windows = sorted((e.time_range.start, e.time_range.end) for e in evs
                     if e.name.startswith("ttft_request_") and e.device_type == CPU)
    kernels = [e for e in evs if e.device_type == CUDA and not e.name.startswith("ttft_request_")]
    rows, per_name = [], {}
    for a, b in windows[-n_reqs:]:
        ks = [k for k in kernels if a <= k.time_range.start <= b]
        if not ks:
            rows.append({"wall_ms": (b - a) / 1e3, "kernels": 0})
            continue
        k0 = min(k.time_range.start for k in ks)
        k1 = max(k.time_range.end for k in ks)
        busy = _union([(k.time_range.start, k.time_range.end) for k in ks])
        # the longest GPU idle gaps: where the GPU waited for the host (offset from the first kernel, length,
        # the kernels on either side)
        srt = sorted(ks, key=lambda k: k.time_range.start)
        gaps, end, prev = [], srt[0].time_range.end, srt[0]
        for k in srt[1:]:
            if k.time_range.start > end:
                gaps.append(((k.time_range.start - end) / 1e3, (end - k0) / 1e3, prev.name[:40], k.name[:40]))
            if k.time_range.end > end:
                end, prev = k.time_range.end, k
        n_gaps, idle_small = len(gaps), sum(g[0] for g in gaps if g[0] < 0.01)
        gaps = [dict(ms=round(g, 3), at_ms=round(t, 3), after=a_, before=b_) for g, t, a_, b_ in sorted(gaps)[-5:]]
        # CUDA runtime calls on the host inside the window (a cudaFree / synchronize stalls the launches)
        api: dict = {}
        for e in evs:
            if e.device_type == CPU and e.name.startswith("cuda") and a <= e.time_range.start <= b:
                d = api.setdefault(e.name, [0, 0.0])
                d[0] += 1
                d[1] += (e.time_range.end - e.time_range.start) / 1e3
        api = {k: [n, round(ms, 3)] for k, (n, ms) in sorted(api.items(), key=lambda kv: -kv[1][1])[:6]}
        rows.append({"wall_ms": (b - a) / 1e3, "host_before_gpu_ms": (k0 - a) / 1e3, "gpu_span_ms": (k1 - k0) / 1e3,
                     "gpu_busy_ms": busy / 1e3, "gpu_idle_in_span_ms": (k1 - k0 - busy) / 1e3,
                     "after_gpu_ms": (b - k1) / 1e3, "kernels": len(ks), "idle_gaps": n_gaps, "idle_in_gaps_under_10us_ms": idle_small,
                     "longest_gaps": gaps[::-1], "cuda_api_calls_ms": api})
        for k in ks:
            d = per_name.setdefault(k.name[:90], [0.0, 0])
            d[0] += (k.time_range.end - k.time_range.start) / 1e3 / n_reqs
            d[1] += 1
    return rows, per_name


def compare(ours_path: str, base_path: str) -> None:
    """Two runs' JSON (this tree and a baseline tree, same call, same device): the unprofiled median TTFTs and
    their ratio as a results row (benchmarks/results/profile_ttft.jsonl), and the profiled breakdown side by
    side. The rows carry the commit and device of the runs, not of the machine that compares them."""
    import sys

    from benchmarks.common import record
    ours, base = (json.load(open(p)) for p in (ours_path, base_path))
    if ours["device"] != base["device"] or ours["tokens"] != base["tokens"]:
        raise SystemExit(f"--compare: runs differ in device or prompt ({ours['device']}, {ours['tokens']} tokens "
                         f"against {base['device']}, {base['tokens']})")
    med = {k: float(np.median(d["unprofiled_ttft_ms"])) for k, d in (("ours", ours), ("base", base))}
    os.environ["PIXTRAL_RT_COMMIT"] = ours["tag"]
    import benchmarks.common as common
    common.device_name = lambda: ours["device"]         # the runs' device, not this machine's
    sys.argv = ["benchmarks/profile_ttft.py", "--compare", ours_path, base_path]
    record("profile_ttft", f"text_{ours['tokens']}_tokens", "ttft_ms", med["ours"], "ms", f"{base['tag']} (same call)",
           med["base"], None, ratio=med["ours"] / med["base"], reps=len(ours["unprofiled_ttft_ms"]),
           ours_timings=ours["unprofiled_median_timings"], baseline_timings=base["unprofiled_median_timings"],
           note="floor: none stated (the same prefill kernels in both trees; the figure is the engine's overhead)")
    for k in ("host_before_gpu_ms", "gpu_busy_ms", "gpu_idle_in_span_ms", "after_gpu_ms"):
        a = [r[k] for r in ours["requests"] if k in r]
        b = [r[k] for r in base["requests"] if k in r]
        print(f"  {k:<22} {np.median(a):7.3f}  {np.median(b):7.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, metavar=("OURS_JSON", "BASELINE_JSON"),
                    help="no run: the ratio of two runs' unprofiled TTFT (written as a results row) and their "
                         "profiled breakdowns")
    ap.add_argument("--model", help="checkpoint folder (default: --random-weights)")
    ap.add_argument("--random-weights", default="Pixtral-12B-2409")
    ap.add_argument("--backend", help="passed to Engine.load (older trees: fast)")
    ap.add_argument("--tokens", type=int, default=1000, help="prompt tokens")
    ap.add_argument("--reps", type=int, default=10, help="unprofiled requests timed")
    ap.add_argument("--profiled", type=int, default=3, help="profiled requests")
    ap.add_argument("--tag", default=os.environ.get("PIXTRAL_RT_COMMIT", "tree"))
    ap.add_argument("--trace", action="store_true", help="also write the chrome trace")
    ap.add_argument("--sync-debug", action="store_true", help="one more request under torch.cuda.set_sync_debug_mode"
                    "('warn'): every synchronising torch op on the request's path is printed with its stack")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    from pixtral_rt.chat import EncodedRequest
    from pixtral_rt.engine import Engine
    from pixtral_rt.sampling import SamplingParams
    kw = {"backend": a.backend} if a.backend else {}
    engine = Engine.load(a.model, max_context=40960, progress=False,
                         random_weights=None if a.model else a.random_weights, **kw)
    rng = np.random.default_rng(0)
    for _ in range(3):                                      # warm-up: graphs, autotuning, allocator
        one(engine, SamplingParams, text_request(EncodedRequest, a.tokens, rng), 8)
    ttft, stages = [], {}
    for _ in range(a.reps):                                 # as bench_e2e: each request after a short decode
        ttft.append(one(engine, SamplingParams, text_request(EncodedRequest, a.tokens, rng), 8))
        for k, v in engine.last.timings.items():
            stages.setdefault(k, []).append(v)
    med = {k: round(float(np.median(v)), 3) for k, v in stages.items()}
    print(f"[{a.tag}] unprofiled TTFT, {a.tokens} tokens: median {np.median(ttft):.2f} ms "
          f"(min {min(ttft):.2f}, max {max(ttft):.2f}); median timings {med}", flush=True)
    reqs = [text_request(EncodedRequest, a.tokens, rng) for _ in range(a.profiled)]
    # the caching allocator across the profiled requests: a cudaMalloc / cudaFree (an allocation retry frees
    # cached blocks, which synchronises the device) on the request's path stalls the launches
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    mem0 = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    timings = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i, r in enumerate(reqs):
            time.sleep(0.05)                                # the previous request's tail is over
            with record_function(f"ttft_request_{i}"):
                one(engine, SamplingParams, r, 1)
            timings.append({k: round(v, 3) for k, v in engine.last.timings.items() if k.endswith("_ms")})
    mem1 = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    alloc = {k: mem1.get(k, 0) - mem0.get(k, 0) for k in keys}
    print(f"[{a.tag}] caching allocator over the {a.profiled} profiled requests: {alloc}", flush=True)
    if a.sync_debug and torch.cuda.is_available():
        import warnings
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one(engine, SamplingParams, text_request(EncodedRequest, a.tokens, rng), 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    rows, per_name = analyse(prof, a.profiled)
    for r, t in zip(rows, timings):
        r["engine_timings"] = t
        print(f"[{a.tag}] " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:14]
    for name, (ms, n) in top:
        print(f"[{a.tag}]   {ms:8.3f} ms  {n // a.profiled:4d}x  {name}")
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, f"profile_ttft_{a.tag}.json"), "w") as f:
        json.dump({"tag": a.tag, "tokens": a.tokens, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "unprofiled_ttft_ms": ttft, "unprofiled_median_timings": med, "allocator": alloc, "requests": rows,
                   "kernels_ms_per_request": {k: v[0] for k, v in per_name.items()}}, f, indent=1)
    if a.trace:
        prof.export_chrome_trace(os.path.join(out, f"profile_ttft_{a.tag}.trace.json"))
    engine.shutdown() if hasattr(engine, "shutdown") else None


if __name__ == "__main__":
    main()
