"""Quantised engines (FP8, int4 W4A16) vs the bf16 engine, end to end on the GPU, in one run (the default
serving engine, batch 1). `--runs` picks the engines (default bf16,fp8; issue 22 adds int4).

Cases (performance.md, issue 10):
  decode tok/s at ~1k-token text context (256 tokens)       floor: weight bytes read per token (FP8 linears
                                                            + bf16 lm_head + norms) + KV bytes, over the
                                                            measured copy bandwidth
  TTFT engine-side, 1 image 1024x1024 + ~30 tokens          floor: vision + attention FLOPs at the measured
                                                            bf16 rate + decoder linear FLOPs at the measured
                                                            FP8 rate (torch._scaled_mm 8192^3)
  quality (with --quality): each quantised engine vs bf16 on 3 requests (text, 1 image, 4 images): relative L2 error and top-1
  agreement of the prompt's last logits, and 64-token greedy agreement (equal-prefix length)

    python -m benchmarks.bench_fp8 --model BF16_DIR [--fp8-model FP8_DIR] [--quality]
    python -m benchmarks.bench_fp8 --random-weights Pixtral-Large-Instruct-2411 --fp8-only
    python -m benchmarks.bench_fp8 --random-weights Pixtral-12B-2409 --runs bf16,fp8,int4
    python -m benchmarks.bench_fp8 --random-weights Pixtral-Large-Instruct-2411 --runs int4 --max-context 131072
Without --fp8-model the FP8 engine quantises BF16_DIR at load (--quantization fp8); int4 quantises at load
(round to nearest, group 128) or draws its random weights in 4 bits. Each record names its engine in the
case ("<model> <run> <case>"); the baseline is the bf16 engine of the same run where it ran. kv_cache_tokens:
the KV pool the engine sized from free memory (8 GB kept free): the largest context that fits.
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from benchmarks.bench_e2e import request, ttft_flops
from benchmarks.common import bench_ms, copy_bandwidth_TBps, matmul_TFLOPs, record
from pixtral_rt.chat import EncodedRequest, encode_request
from pixtral_rt.config import PRESETS
from pixtral_rt.engine import Engine
from pixtral_rt.loading import kv_bytes_per_token, resolve_model
from pixtral_rt.sampling import SamplingParams

BENCH = "fp8"


def fp8_matmul_TFLOPs(n: int = 8192) -> float:
    from pixtral_rt.fp8 import quantize_activations
    x8, sx = quantize_activations(torch.randn(n, n, device="cuda"))
    w8, sw = quantize_activations(torch.randn(n, n, device="cuda"))
    f = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.reshape(1, n), out_dtype=torch.bfloat16)  # noqa
    return 2 * n ** 3 / bench_ms(f) / 1e9


def linear_flops(args, tokens: int) -> float:
    t = args.text
    layer = t.dim * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * t.dim + 3 * t.dim * t.hidden_dim
    return 2 * tokens * t.n_layers * layer


def text_request(n: int, rng) -> EncodedRequest:
    toks = [1, 3] + rng.integers(1000, 30000, n - 3).tolist() + [4]
    return EncodedRequest(tokens=toks, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                          prompt_tokens=len(toks))


@torch.inference_mode()
def prompt_logits(engine: Engine, req: EncodedRequest) -> torch.Tensor:
    """Last-token logits of a prompt through the serving engine's model (FastPagedModel), written into pages
    1.. of its pool: only while the engine is idle, and the pool's cached prefixes are garbage afterwards
    (call it last)."""
    m = engine.llm.runner.model
    P, dev = m.page_size, m.device
    T = req.prompt_tokens
    toks = torch.tensor(req.tokens, device=dev)
    h = m.embed(toks)
    if req.images:
        h = h.clone()
        h[torch.tensor(req.image_token_positions, device=dev)] = m.image_features(req).to(h.dtype)
    pos = torch.arange(T, device=dev, dtype=torch.int32)
    npg = -(-T // P)
    table = torch.arange(1, npg + 1, device=dev, dtype=torch.int32)[None]
    return m.prefill(h, pos, pos // P + 1, pos % P, table, torch.tensor([0, T], device=dev, dtype=torch.int32),
                     torch.zeros(1, device=dev, dtype=torch.int32), T,
                     torch.tensor([T - 1], device=dev))[0].float().cpu()


def decode_rate(engine: Engine, req: EncodedRequest, n_tokens: int, reps: int = 3) -> dict:
    """Median decode tok/s over `reps` requests of req's length, each a fresh prompt (ids 1000..30000, valid in
    every preset's vocabulary; new ids each time, so the prefix cache serves none), n_tokens tokens each."""
    rng = np.random.default_rng(len(req.tokens))
    rates = []
    for _ in range(reps):
        r = text_request(req.prompt_tokens, rng)
        for _ in engine.stream(None, SamplingParams(max_tokens=n_tokens), req=r):
            pass
        if len(engine.last.token_ids) >= n_tokens // 2:
            rates.append(engine.last.timings["decode_tok_s"])
    return {"decode_tok_s": float(np.median(rates)) if rates else float("nan"), "ttft_ms": engine.last.timings["ttft_ms"],
            "peak_GB": torch.cuda.max_memory_allocated() / 1e9, "tokens": len(engine.last.token_ids)}


class _Encoder:
    """Engine.encode without an engine: the tokenizer and config of a resolved ModelSource."""

    def __init__(self, src):
        self.tokenizer, self.args = src.tokenizer, src.args

    def encode(self, messages, params, raw_pixels: bool = True) -> EncodedRequest:
        return encode_request(messages, self.tokenizer, self.args, max_images=12, max_context=16384,
                              max_tokens=params.max_tokens, raw_pixels=raw_pixels)


def run_engine(label, load_kw, reqs, quality_reqs, n_tokens, max_context: int = 16384) -> dict:
    t0 = time.perf_counter()
    engine = Engine.load(max_context=max_context, progress=False, **load_kw)
    out = {"load_s": time.perf_counter() - t0, "info": dict(engine.info), "args": engine.args}
    dec = getattr(engine.llm.runner.model, "local", engine.llm.runner.model).decoder   # TP: rank 0's shard
    out["weight_bytes"] = dec.weight_bytes_per_token
    out["gpu_GB_after_load"] = torch.cuda.memory_allocated() / 1e9
    out["speed"] = {}
    for c, r in reqs.items():
        try:
            if callable(r):   # a fresh prompt per repetition (new pixels): no prefix / image-feature cache hit
                ttft = []
                for _ in range(4):
                    for _ in engine.stream(None, SamplingParams(max_tokens=2), req=r()):
                        pass
                    ttft.append(engine.last.timings["ttft_ms"])
                print(f"[{label}] {c}: TTFT per repetition {[round(t, 1) for t in ttft]} ms (first = cold)")
                out["speed"][c] = {"ttft_ms": float(np.median(ttft[1:])), "vision_ms": 0.0,
                                   "decode_tok_s": float("nan"), "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
                                   "ttft_cold_ms": ttft[0]}
                continue
            out["speed"][c] = decode_rate(engine, r, n_tokens)
        except Exception as exc:  # noqa: BLE001 - keep the other figures; the failure is printed and recorded
            print(f"[{label}] {c} FAILED: {type(exc).__name__}: {exc}")
            out.setdefault("failed", {})[c] = f"{type(exc).__name__}: {exc}"
    out["greedy"], out["logits"] = {}, {}
    for c, r in quality_reqs.items():
        for _ in engine.stream(None, SamplingParams(max_tokens=64), req=r):
            pass
        out["greedy"][c] = list(engine.last.token_ids)
    for c, r in quality_reqs.items():
        out["logits"][c] = prompt_logits(engine, r)
    print(f"[{label}] load {out['load_s']:.1f} s, {out['gpu_GB_after_load']:.1f} GB allocated, "
          f"{engine.info.get('kv_cache_tokens')} KV tokens; {engine.info.get('precision')}")
    engine.shutdown()
    del engine, dec
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bf16 checkpoint folder")
    ap.add_argument("--fp8-model", help="FP8 compressed-tensors checkpoint of the same weights (else quantise --model)")
    ap.add_argument("--random-weights", metavar="PRESET", help="generate weights on the GPU instead (no checkpoint)")
    ap.add_argument("--fp8-only", action="store_true", help="no bf16 engine (a model whose bf16 weights do not fit); "
                    "same as --runs fp8")
    ap.add_argument("--runs", default="bf16,fp8", help="engines to run, in order: bf16, fp8 (decode w8a16, the default), "
                    "fp8_w8a8 (decode on quantised activations), int4 (comma-separated)")
    ap.add_argument("--max-context", type=int, default=16384, help="the engines' max context (the KV pool is "
                    "sized from free memory either way)")
    ap.add_argument("--quality", action="store_true", help="each quantised engine vs bf16: logits and greedy agreement")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    bw = copy_bandwidth_TBps() * 1e12
    bf_rate, f8_rate = matmul_TFLOPs() * 1e12, fp8_matmul_TFLOPs() * 1e12
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {bf_rate / 1e12:.0f} TFLOP/s, "
          f"fp8 matmul {f8_rate / 1e12:.0f} TFLOP/s")
    src = {"random_weights": a.random_weights} if a.random_weights else {}
    labels = ["fp8"] if a.fp8_only else [x.strip() for x in a.runs.split(",") if x.strip()]
    bad = [x for x in labels if x not in ("bf16", "fp8", "fp8_w8a8", "int4")]
    if bad or not labels:
        ap.error(f"--runs: unknown engine(s) {bad}; choose from bf16, fp8, fp8_w8a8, int4")
    runs = {}
    for label in labels:
        quant = label.split("_")[0]
        if quant == "fp8" and a.fp8_model:
            runs[label] = {"model": a.fp8_model}
        else:
            runs[label] = {"model": a.model, **src, **({} if label == "bf16" else {"quantization": quant})}
        if label == "fp8_w8a8":                # FP8 decode on quantised activations (RuntimeOptions.fp8_decode)
            from pixtral_rt.options import RuntimeOptions
            runs[label]["options"] = RuntimeOptions(fp8_decode="w8a8")
        if a.random_weights:
            runs[label].pop("model", None)
    # the requests, planned once with the model's tokenizer (no weights loaded for this)
    first = next(iter(runs.values()))
    enc = _Encoder(resolve_model(first.get("model"), None, None, None, None, a.random_weights))
    rng = np.random.default_rng(0)
    # text ids below 30000: valid in Pixtral-Large's 32768-token vocabulary too. TTFT: a new random image per
    # repetition, so neither the prefix cache nor the image-feature cache can serve it
    reqs = {"a_1img_1024": lambda: request(enc, "a_1img_1024", rng)[0], "c_text_1k": text_request(1000, rng)}
    quality_reqs = {} if not a.quality else {"text_300": text_request(300, rng),
                                             "1img_1024": request(enc, "a_1img_1024", rng)[0],
                                             "4imgs_mixed": request(enc, "b_4imgs_mixed", rng)[0]}
    results = {label: run_engine(label, kw, reqs, quality_reqs, a.tokens, a.max_context) for label, kw in runs.items()}
    bf = results.get("bf16")
    for label, r in results.items():
        args = r["args"]
        model_name = next((p.name for p in PRESETS.values() if p.text == args.text), args.name)
        for c, o in r["speed"].items():
            req = reqs[c]() if callable(reqs[c]) else reqs[c]
            if c == "c_text_1k":
                ctx = req.prompt_tokens + a.tokens / 2
                kvb = kv_bytes_per_token(args) * ctx
                floor = bw / (r["weight_bytes"] + kvb)
                record(BENCH, f"{model_name} {label} {c}", "decode_tok_s", o["decode_tok_s"], "tok/s",
                       "bf16 engine (same run)" if bf else None,
                       bf["speed"][c]["decode_tok_s"] if bf and c in bf["speed"] else None,
                       floor, fraction_of_floor=round(o["decode_tok_s"] / floor, 3), weight_GB=r["weight_bytes"] / 1e9,
                       kv_cache_tokens=r["info"].get("kv_cache_tokens"), load_s=round(r["load_s"], 1))
            else:
                fl, lin = ttft_flops(args, req), linear_flops(args, req.prompt_tokens)
                # int4 (W4A16) prefill runs bf16 tensor-core math on dequantised tiles: the bf16 rate
                floor_ms = ((fl - lin) / bf_rate + lin / (f8_rate if label.startswith("fp8") else bf_rate)) * 1e3
                record(BENCH, f"{model_name} {label} {c}", "ttft_ms_engine", o["ttft_ms"], "ms",
                       "bf16 engine (same run)" if bf else None,
                       bf["speed"][c]["ttft_ms"] if bf and c in bf["speed"] else None, floor_ms,
                       prompt_tokens=req.prompt_tokens, ttft_cold_ms=round(o["ttft_cold_ms"], 1),
                       peak_GB=round(o["peak_GB"], 1), uncached="new image each repetition")
        for c, why in r.get("failed", {}).items():
            print(f"NOT MEASURED: {model_name} {label} {c}: {why}")
        record(BENCH, f"{model_name} {label}", "kv_cache_tokens", r["info"].get("kv_cache_tokens") or 0, "tokens",
               None, None, None, gpu_GB_after_load=round(r["gpu_GB_after_load"], 1), precision=r["info"].get("precision"))
    for label, q in results.items():           # each quantised engine against bf16 on the same prompts
        if bf is None or not a.quality or label == "bf16":
            continue
        for c in quality_reqs:
            lb, lf = bf["logits"][c], q["logits"][c]
            err = float((lf.double() - lb.double()).norm() / lb.double().norm())
            gb, gf = bf["greedy"][c], q["greedy"][c]
            prefix = next((i for i, (x, y) in enumerate(zip(gb, gf)) if x != y), min(len(gb), len(gf)))
            same = sum(x == y for x, y in zip(gb, gf)) / max(1, min(len(gb), len(gf)))
            record(BENCH, f"quality {c}", f"logits_rel_err_{label}_vs_bf16", err, "", None, None, None,
                   top1_same=bool(lb.argmax() == lf.argmax()), max_abs_err=float((lf - lb).abs().max()),
                   greedy_equal_prefix=prefix, greedy_same_fraction=round(same, 3), greedy_tokens=len(gb))

if __name__ == "__main__":
    main()
