"""Int4 (W4A16) linear kernels on the Pixtral-12B decoder's shapes, each beside bf16 and FP8 in the same run.

  M = 1        kernels/int4_gemv.py GEMV, both kernels ("gemv": the 2-D plane kernel, vec=0; "gemv_v": the 3-D
               one), and kernels/int4_gemm.py (tensor cores, row padded to 16)
               vs bf16 Triton GEMV (kernels/gemv.py, the decoder's tuned tiles), cuBLAS bf16, FP8 GEMV
  M = 16, 64   kernels/int4_gemm.py skinny tiles        vs cuBLAS bf16 (F.linear), FP8 skinny GEMM
  M = 512, 4096  kernels/int4_gemm.py "triton" (prefill tiles) and "dequant" (int4_dequant + cuBLAS)
               vs cuBLAS bf16, FP8 (per-token quantisation + torch._scaled_mm); TFLOP/s = 2 M N K / t
Floor of each case: its int4 bytes (packed weights + scales + activations in and out) over the nominal HBM
bandwidth (H100 3.35 TB/s, H200 4.8 TB/s; the measured copy bandwidth on other devices, and as a field);
prefill rows also carry compute_floor_us (2 M N K at the dense bf16 peak, 989 TFLOP/s on both). Weights
rotate through copies larger than L2 (a decode step never finds W in cache); decode cases are timed as CUDA
graph replays. Every int4 result is checked against the exact dequantised reference first (rel_err field).
--sweep tries a few tiles per shape and prints the winners as Python dicts for pixtral_rt/decoder.py
(INT4_GEMV_CONFIGS / INT4_SKINNY_CONFIGS / INT4_PREFILL_CONFIGS) and which backend wins at M = 1 and prefill.

Rows: benchmarks/results/int4.jsonl (bench, case, metric, value, unit, baseline, baseline_value, floor,
device, date, commit from $PIXTRAL_RT_COMMIT, command, + fields). --cpu-smoke: tiny shapes in the Triton
interpreter, wall-clock timing, rows to int4_cpu_smoke.jsonl (a check of the harness, not a measurement).

    python -m benchmarks.bench_int4 [--sweep] [--rows 1,16,64,512,4096]
    TRITON_INTERPRET=1 python -m benchmarks.bench_int4 --cpu-smoke
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

# the interpreter must be chosen before triton is imported (it replaces @triton.jit at import)
if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_fp8_linear import graph_ms  # noqa: E402
from benchmarks.common import record  # noqa: E402
from pixtral_rt import int4  # noqa: E402
from pixtral_rt.config import PIXTRAL_12B  # noqa: E402
from pixtral_rt.fp8 import quantize_weight as fp8_quantize_weight  # noqa: E402
from pixtral_rt.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from pixtral_rt.kernels.fp8_quant import fp8_quant  # noqa: E402
from pixtral_rt.kernels.gemv import gemv  # noqa: E402
from pixtral_rt.kernels.int4_gemm import fit_stages, int4_gemm  # noqa: E402
from pixtral_rt.kernels.int4_gemv import int4_gemv  # noqa: E402

NOMINAL_HBM = {"H100": 3.35e12, "H200": 4.8e12}       # bytes / s
BF16_PEAK = 989e12                                    # dense bf16 FLOP/s, H100 and H200 SXM


def shapes_12b() -> dict[str, tuple[int, int]]:
    t = PIXTRAL_12B.text
    return {"wqkv": ((t.n_heads + 2 * t.n_kv_heads) * t.head_dim, t.dim), "wo": (t.dim, t.n_heads * t.head_dim),
            "w13": (2 * t.hidden_dim, t.dim), "w2": (t.dim, t.hidden_dim)}


SMOKE_SHAPES = {"small": (96, 256), "awkward": (40, 384)}


class Weights:
    """One (N, K) weight in bf16, FP8 and int4, in copies totalling >= `total` bytes of the int4 form; each
    next_*() takes the next copy (never L2-resident on the GPU). exact: the dequantised int4 W, fp32."""

    def __init__(self, N, K, device, total=256 << 20, copies=None):
        g = torch.Generator().manual_seed(N + K)
        w = (torch.randn(N, K, generator=g) * 0.02).to(device)
        packed, scale = int4.quantize_and_pack(w.bfloat16())
        n = copies or max(2, -(-total // (N * K // 2)))
        sdt = torch.bfloat16 if torch.device(device).type == "cuda" else None
        self.int4 = [int4.Int4Weight.from_checkpoint(packed, scale, device, sdt) for _ in range(n)]
        self.exact = int4.dequantize(packed, scale).to(device)
        w8, s8 = fp8_quantize_weight(w)
        self.fp8 = [(w8.clone(), s8.reshape(-1).contiguous()) for _ in range(max(2, n // 2))]
        dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.dense = [w.to(dt) for _ in range(max(2, n // 4))]
        self.i = 0

    def _next(self, xs):
        self.i += 1
        return xs[self.i % len(xs)]

    def next_int4(self):
        return self._next(self.int4)

    def next_fp8(self):
        return self._next(self.fp8)

    def next_dense(self):
        return self._next(self.dense)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="activation rows M to time, comma list (default 1,16,64,512,"
                                                 "4096; --cpu-smoke 1,16,70)")
    ap.add_argument("--sweep", action="store_true", help="try a few tiles per shape, print the winners")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton interpreter (CI check)")
    ap.add_argument("--results-dir", default=None, help="where the .jsonl goes (default benchmarks/results)")
    a = ap.parse_args(argv)
    if a.results_dir:
        common.RESULTS_DIR = __import__("pathlib").Path(a.results_dir)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA GPU: run on the GPU machine, or --cpu-smoke here")
    dev = "cpu" if smoke else "cuda"
    bench = "int4_cpu_smoke" if smoke else "int4"
    rows = [int(r) for r in (a.rows or ("1,16,70" if smoke else "1,16,64,512,4096")).split(",")]
    torch.manual_seed(0)
    name = common.device_name()
    copy_bw = None if smoke else common.copy_bandwidth_TBps() * 1e12
    hbm = next((v for k, v in NOMINAL_HBM.items() if k in name), copy_bw)
    if not smoke:
        print(f"{name}: copy bandwidth {copy_bw / 1e12:.2f} TB/s; floors at {hbm / 1e12:.2f} TB/s")
    act_dt = torch.float32 if smoke else torch.bfloat16

    def timed(fn, decode: bool) -> float:
        """Milliseconds per call: CUDA-graph replays (decode) or events (prefill) on the GPU, wall clock here."""
        if smoke:
            return common.median_wall_ms(fn, reps=3)
        return graph_ms(fn) if decode else common.bench_ms(fn)

    def best(fn_of_cfg, cfgs, decode):
        out = None
        for cfg in cfgs:
            try:
                ms = timed(lambda: fn_of_cfg(cfg), decode)
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit shared memory / registers
                print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            if out is None or ms < out[0]:
                out = (ms, cfg)
        return out

    from pixtral_rt.decoder import GEMV_CONFIGS
    GEMV_V_DEFAULT = dict(vec=4, block_n=4, num_warps=1)      # the 3-D GEMV's tiles when not swept
    won = {"gemv": {}, "gemv_ms": {}, "skinny": {}, "prefill": {}, "m1": {}, "prefill_backend": {}}
    for label, (N, K) in (SMOKE_SHAPES if smoke else shapes_12b()).items():
        W = Weights(N, K, dev, copies=2 if smoke else None)
        case0 = f"{'tiny' if smoke else PIXTRAL_12B.name} {label} ({N}x{K})"
        w4_bytes = W.int4[0].nbytes()
        fp8_bytes = N * K + 4 * N
        for M in rows:
            x = torch.randn(M, K, device=dev, dtype=act_dt)
            ref = x.double() @ W.exact.double().T
            io = 2 * M * (K + N)                         # activations in + out, bf16
            floor_us = (w4_bytes + io) / hbm * 1e6 if hbm else None
            case = f"{case0} M={M}"
            decode = M <= 64
            ms_dense = timed(lambda: F.linear(x, W.next_dense()), decode)
            base = "cuBLAS bf16 F.linear" if not smoke else "torch fp32 F.linear (CPU)"
            if M <= 64:         # the FP8 decode the decoder runs: per-token quantiser + skinny W8A8 GEMM
                ms_fp8 = timed(lambda: fp8_gemm(*fp8_quant(x), *W.next_fp8(), out_dtype=x.dtype, backend="skinny"),
                               decode)
            else:
                ms_fp8 = timed(lambda: fp8_gemm(*fp8_quant(x), *W.next_fp8(), out_dtype=x.dtype,
                                                backend="triton" if smoke else "scaled_mm"), decode)
            extra = dict(fp8_us=ms_fp8 * 1e3, bf16_us=ms_dense * 1e3, int4_bytes=w4_bytes, fp8_bytes=fp8_bytes,
                         copy_TBps=None if copy_bw is None else copy_bw / 1e12,
                         timing="wall clock, interpreter" if smoke else ("cuda graph" if decode else "cuda events"))
            impls = []                                   # (name, fn(cfg), sweep configs)
            if M == 1:
                ms_gemv_bf = timed(lambda: gemv(x, W.next_dense(), **GEMV_CONFIGS.get((N, K), {})), decode)
                extra["bf16_triton_gemv_us"] = ms_gemv_bf * 1e3
                impls.append(("gemv", lambda c: int4_gemv(x, W.next_int4(), **c),
                              [dict(block_n=bn, num_warps=w, num_stages=s) for bn, w, s in
                               itertools.product((8, 16, 32), (4, 8), (3, 4))]))
                # the 3-D kernel (in-place nibbles, one lop3 each; benchmarks/kernel_sass.py counts its SASS):
                # one or two warps of a few rows each, so x is converted once for several rows
                impls.append(("gemv_v", lambda c: int4_gemv(x, W.next_int4(), **{**GEMV_V_DEFAULT, **c}),
                              [dict(vec=4, block_n=bn, num_warps=w, num_stages=s) for bn, w, s in
                               itertools.product((2, 4, 8), (1, 2), (1, 2, 3))]))
            if M <= 64:
                bm = min(64, max(16, 1 << (M - 1).bit_length()))
                # stages lowered to what fits shared memory (the kernel's own rule); duplicates dropped
                plane, xb = W.int4[0].plane, x.element_size()
                # block_p 64: half a plane a step (kernel_sass: the 64-row tiles spill with whole planes)
                gcfgs = {(bn, w, fit_stages(st, bm, bn, bp or plane, xb), bp) for bn, w, st, bp in
                         itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (0, 64))}
                impls.append(("gemm", lambda c: int4_gemm(x, W.next_int4(), **c),
                              [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, **({"block_p": bp} if bp else {}))
                               for bn, w, st, bp in sorted(gcfgs)]))
                # the same kernel on the fp32 nibble path (no inline PTX), default tiles: the same-run baseline
                impls.append(("gemm_fp32_nibbles", lambda c: int4_gemm(x, W.next_int4(), asm=False, **c), []))
            else:
                impls.append(("gemm", lambda c: int4_gemm(x, W.next_int4(), **c),
                              [dict(block_m=bm, block_n=bn, group_m=8, num_warps=w, num_stages=s)
                               for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3,))]))
                impls.append(("dequant", lambda c: int4_gemm(x, W.next_int4(), backend="dequant"), []))
            results = {}
            for impl, fn, cfgs in impls:
                got = fn({})
                err = rel_err(got, ref)
                if err > (1e-5 if smoke else 2e-2):
                    raise SystemExit(f"{case} int4 {impl}: relative error {err:.3e} against the exact "
                                     f"dequantised reference: the kernel is wrong, not slow")
                swept = best(fn, cfgs, decode) if a.sweep and cfgs and not smoke else None
                if swept is not None:
                    ms, cfg = swept
                else:                                    # no sweep, or no swept tile fits: the defaults
                    ms, cfg = timed(lambda: fn({}), decode), {}
                results[impl] = ms
                flops = 2 * M * N * K
                row = dict(extra, rel_err=err, config=cfg, speedup_vs_bf16=ms_dense / ms, speedup_vs_fp8=ms_fp8 / ms,
                           weight_read_TBps=w4_bytes / ms / 1e9)
                if M > 64:
                    row.update(TFLOPs=flops / ms / 1e9, bf16_TFLOPs=flops / ms_dense / 1e9,
                               compute_floor_us=flops / BF16_PEAK * 1e6)
                record(bench, f"{case} int4 {impl}", "time", ms * 1e3, "us", base, ms_dense * 1e3, floor_us, **row)
                if impl in ("gemv", "gemv_v") and ms < won["gemv_ms"].get((N, K), float("inf")):
                    # the faster of the two GEMV kernels takes INT4_GEMV_CONFIGS (vec tells which)
                    won["gemv_ms"][(N, K)] = ms
                    won["gemv"][(N, K)] = dict(GEMV_V_DEFAULT, **cfg) if impl == "gemv_v" else cfg
                elif cfg and impl == "gemm" and 2 <= M <= 64:     # the decoder keys skinny tiles by block_m
                    won["skinny"].setdefault((N, K), {})[cfg["block_m"]] = {
                        k: v for k, v in cfg.items() if k != "block_m"}
                elif cfg and impl == "gemm" and M > 64:           # the largest M swept wins the table
                    won["prefill"][(N, K)] = cfg
            record(bench, f"{case} fp8", "time", ms_fp8 * 1e3, "us", base, ms_dense * 1e3,
                   (fp8_bytes + io) / hbm * 1e6 if hbm else None, timing=extra["timing"])
            if M == 1:
                fastest = min((r for r in results if r != "gemm_fp32_nibbles"), key=results.get)
                won["m1"][(N, K)] = "gemv" if fastest == "gemv_v" else fastest    # INT4_M1_BACKEND's names
            if M > 64:
                won["prefill_backend"][(N, K, M)] = min(results, key=results.get)
        del W
        if not smoke:
            torch.cuda.empty_cache()
    print("\n# fastest int4 path at M = 1 per (N, K):", won["m1"])
    print("# fastest int4 prefill backend per (N, K, M):", won["prefill_backend"])
    if a.sweep:
        for table, key in (("INT4_GEMV_CONFIGS", "gemv"), ("INT4_PREFILL_CONFIGS", "prefill")):
            print(f"{table} = {{")
            for k, v in won[key].items():
                print(f"    {k}: dict({', '.join(f'{p}={q}' for p, q in v.items())}),")
            print("}")
        print("INT4_SKINNY_CONFIGS = {")
        for k, per in won["skinny"].items():
            print(f"    {k}: {{" + ", ".join(f"{bm}: dict({', '.join(f'{p}={q}' for p, q in c.items())})"
                                          for bm, c in per.items()) + "},")
        print("}")


if __name__ == "__main__":
    main()
