"""End to end on the GPU: pixtral_rt (fast backend, CUDA graphs) vs HF transformers on the SAME random
Pixtral-12B weights, in one run. Cases (performance.md):
  a) one 1024x1024 image + ~30 text tokens: TTFT, decode tok/s
  b) four mixed images (1024^2, 512x768, 768x512, 256^2): TTFT, decode tok/s
  c) text only, 1k-token context: TTFT, decode tok/s
  d) text only, 32k-token context: TTFT, decode tok/s
  --first-request: user-visible TTFT, cold (first request in a fresh process) vs warm, for one 1024^2 image,
     the 4-image set and an odd pair 37x1500 + 640x480, JPEG files on disk (benchmarks/first_request.py)
Peak GPU memory for each. Floors: decode = weight bytes + KV bytes per token over the measured copy
bandwidth; TTFT floor from performance.md's FLOP count over the measured bf16 matmul rate.

    python benchmarks/bench_e2e.py --model /path/to/checkpoint [--skip-hf] [--tokens 128]
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from benchmarks.common import record
from pixtral_rt.chat import EncodedRequest
from pixtral_rt.engine import Engine, decoder_weight_bytes, kv_bytes_per_token
from pixtral_rt.sampling import SamplingParams

IMAGE_SETS = {"a_1img_1024": [(1024, 1024)], "b_4imgs_mixed": [(1024, 1024), (512, 768), (768, 512), (256, 256)]}


def ceilings() -> tuple[float, float]:
    """Measured copy bandwidth (B/s, read + write) and bf16 matmul rate (FLOP/s) on this GPU."""
    from benchmarks.common import copy_bandwidth_TBps, matmul_TFLOPs
    return copy_bandwidth_TBps() * 1e12, matmul_TFLOPs() * 1e12


def ttft_flops(args, req: EncodedRequest) -> float:
    """Matmul + attention FLOPs from prompt to first token: vision encoder (+ adapter) over the patches,
    then the decoder over all prompt tokens (causal attention), logits for the last token only."""
    v, t = args.vision, args.text
    patches = [b - a for a, b in zip(req.cu_seqlens[:-1], req.cu_seqlens[1:])]
    n = sum(patches)
    vis_params = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size) \
        + 3 * v.patch_size ** 2 * v.hidden_size + v.hidden_size * t.dim + t.dim * t.dim
    vis_attn = v.num_hidden_layers * 4 * v.hidden_size * sum(p * p for p in patches)
    T = req.prompt_tokens
    layer = t.dim * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * t.dim + 3 * t.dim * t.hidden_dim
    text_attn = t.n_layers * 2 * T * T * t.n_heads * t.head_dim  # causal: half of 4 * T^2 * H * D
    return 2 * n * vis_params + vis_attn + 2 * T * t.n_layers * layer + text_attn + 2 * t.dim * t.vocab_size


def request(engine: Engine, case: str, rng) -> tuple[EncodedRequest, EncodedRequest]:
    """(the engine's own request: raw pixels for GPU preprocessing, the same request normalised on the
    host for HF)."""
    if case in IMAGE_SETS:
        imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for (h, w) in IMAGE_SETS[case]]
        text = " ".join(["describe the picture in detail please"] * 5)  # ~30 tokens
        msgs = [{"role": "user", "content": [{"type": "image", "image": im} for im in imgs] +
                 [{"type": "text", "text": text}]}]
        p = SamplingParams(max_tokens=1)
        return engine.encode(msgs, p), engine.encode(msgs, p, raw_pixels=False)
    n = {"c_text_1k": 1000, "d_text_32k": 32000}[case]
    toks = [1, 3] + rng.integers(1000, 100000, n - 3).tolist() + [4]
    r = EncodedRequest(tokens=toks, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                       prompt_tokens=len(toks))
    return r, r


def run_ours(engine: Engine, case: str, n_tokens: int, seed: int, reps: int = 3) -> dict:
    """Each rep a fresh request of the case (new pixels, new text tokens, same shapes): the serving engine's
    image-feature and prefix caches would otherwise serve reps 2.. and time a cache hit, not a prompt."""
    p = SamplingParams(max_tokens=n_tokens)
    torch.cuda.reset_peak_memory_stats()
    ttft, tps = [], []
    for i in range(reps):
        req = request(engine, case, np.random.default_rng(seed + 1 + i))[0]
        for _ in engine.stream(None, p, req=req):
            pass
        r = engine.last
        ttft.append(r.timings["ttft_ms"])
        if len(r.token_ids) >= n_tokens // 2:
            tps.append(r.timings["decode_tok_s"])
    t = engine.last.timings
    return {"ttft_ms": float(np.median(ttft)), "decode_tok_s": float(np.median(tps)) if tps else float("nan"),
            "peak_GB": torch.cuda.max_memory_allocated() / 1e9, "tokens": len(engine.last.token_ids),
            "stages_ms": {k: round(t.get(k, 0.0), 2) for k in ("encode_ms", "queue_ms", "vision_ms", "prefill_ms")}}


def build_hf(sd: dict, args):
    """HF LlavaForConditionalGeneration with the same weights (HF names, q/k rows permuted as HF's
    conversion does)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from pixtral_rt.checkpoint import mistral_to_hf_key, permute_for_hf, rotary_heads
    cfg = LlavaConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("model_type", "architectures")})
    with torch.device("cuda"):
        hf = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    hsd = hf.state_dict()
    with torch.no_grad():
        for k in list(sd):
            t = sd.pop(k)
            h = rotary_heads(k, args)
            hsd[mistral_to_hf_key(k)].copy_(permute_for_hf(t, h) if h else t)
    return hf


def run_hf(hf, args, req: EncodedRequest, n_tokens: int) -> dict:
    ids = torch.tensor([req.tokens], device="cuda")
    kw = {}
    if req.images:
        H = max(i.shape[1] for i in req.images)
        W = max(i.shape[2] for i in req.images)
        px = torch.zeros(len(req.images), 3, H, W, device="cuda", dtype=torch.bfloat16)
        for i, im in enumerate(req.images):
            px[i, :, :im.shape[1], :im.shape[2]] = im.to("cuda")
        kw = {"pixel_values": px, "image_sizes": torch.tensor([[im.shape[1], im.shape[2]] for im in req.images],
                                                               device="cuda")}
    torch.cuda.reset_peak_memory_stats()
    ts = []
    with torch.inference_mode():
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf(input_ids=ids, logits_to_keep=1, **kw)
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) * 1e3)
        ttft = float(np.median(ts[1:]))
        dts = []
        for new in (1, n_tokens + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
            torch.cuda.synchronize()
            dts.append(time.perf_counter() - t)
    return {"ttft_ms": ttft, "decode_tok_s": n_tokens / (dts[1] - dts[0]),
            "peak_GB": torch.cuda.max_memory_allocated() / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (e.g. written by pixtral_rt.random_weights); required "
                    "except with --first-request (random Pixtral-12B weights drawn on the GPU by default)")
    ap.add_argument("--first-request", action="store_true", help="cold vs warm user-visible TTFT, each case in a "
                    "fresh process (benchmarks/first_request.py)")
    ap.add_argument("--random-weights", default=None, help="no checkpoint: this preset's random weights drawn on the "
                    "GPU (with --first-request, or with --skip-hf)")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per case")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--backend", default="auto", help="engine backend (Engine.load): auto = the serving engine; "
                    "fast = the batch-1 engine, kept until the one-engine change measures against it")
    ap.add_argument("--anchor-json", help="gptfast_anchor.py output (JSON lines) measured in the same GPU call")
    ap.add_argument("--cases", default=None, help="comma-separated (default: a_1img_1024,b_4imgs_mixed,c_text_1k,"
                    "d_text_32k; with --first-request a_1img_1024,b_4imgs_mixed,c_2imgs_odd)")
    a = ap.parse_args()
    if a.first_request:
        from benchmarks.first_request import CASES, run
        cases = a.cases.split(",") if a.cases else list(CASES)
        run(a.model, a.random_weights or (None if a.model else "Pixtral-12B-2409"), cases, 3, 16384)
        return
    if not a.model and not (a.random_weights and a.skip_hf):
        ap.error("--model is required (except with --first-request, or --random-weights PRESET with --skip-hf)")
    bw, fl_rate = ceilings()
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {fl_rate / 1e12:.0f} TFLOP/s")
    t0 = time.perf_counter()
    engine = Engine.load(a.model, max_context=40960, progress=False, backend=a.backend,
                         random_weights=None if a.model else a.random_weights)
    engine_name = engine.info["backend"]
    load_s = time.perf_counter() - t0
    record("e2e", "engine_load_and_capture", "wall", load_s, "s", None, None, None)
    rng = np.random.default_rng(0)
    cases = (a.cases or "a_1img_1024,b_4imgs_mixed,c_text_1k,d_text_32k").split(",")
    both = {c: request(engine, c, rng) for c in cases}
    reqs = {c: both[c][0] for c in cases}
    args = engine.args
    wbytes = decoder_weight_bytes(args)
    ours = {c: run_ours(engine, c, a.tokens, seed=100 * k) for k, c in enumerate(cases)}
    hf_res = {}
    if not a.skip_hf:
        from pixtral_rt.checkpoint import load_state_dict, plan_checkpoint
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        sd = load_state_dict(plan_checkpoint(a.model), device="cuda", dtype=torch.bfloat16, progress=False)
        hf = build_hf(sd, args)
        del sd
        for c in cases:
            if c == "d_text_32k":
                continue  # HF at 32k: eager generate takes minutes of device time; gpt-fast anchor covers decode
            try:
                hf_res[c] = run_hf(hf, args, both[c][1], min(a.tokens, 32))
            except Exception as exc:  # noqa: BLE001 - keep our figures even if the baseline breaks
                print(f"HF baseline failed on {c}: {type(exc).__name__}: {exc}")
        del hf
    for c in cases:
        o, h = ours[c], hf_res.get(c)
        ctx = reqs[c].prompt_tokens + a.tokens / 2
        floor_tps = bw / (wbytes + kv_bytes_per_token(args) * ctx)
        record("e2e", c, "decode_tok_s", o["decode_tok_s"], "tok/s", "hf_transformers_generate",
               h["decode_tok_s"] if h else None, floor_tps, prompt_tokens=reqs[c].prompt_tokens,
               fraction_of_floor=round(o["decode_tok_s"] / floor_tps, 3), engine=engine_name)
        fl = ttft_flops(args, reqs[c])
        record("e2e", c, "ttft_ms", o["ttft_ms"], "ms", "hf_transformers_forward", h["ttft_ms"] if h else None,
               fl / fl_rate * 1e3, prompt_tokens=reqs[c].prompt_tokens, ttft_TFLOP=round(fl / 1e12, 2),
               engine=engine_name, **o["stages_ms"])
        if c == "c_text_1k" and a.anchor_json:
            import json
            from pathlib import Path
            rec = json.loads(Path(a.anchor_json).read_text().strip().splitlines()[-1])
            anchor = float(np.median([v for k, v in rec.items() if k.endswith("_tok_s")]))
            record("e2e", c, "decode_tok_s_vs_gptfast", o["decode_tok_s"], "tok/s",
                   "gptfast_style_torch_compile_reduce_overhead", anchor, floor_tps)
        record("e2e", c, "peak_gpu_GB", o["peak_GB"], "GB", "hf_transformers", h["peak_GB"] if h else None, None)


if __name__ == "__main__":
    main()
