"""One full decode step of the Pixtral-12B text decoder (random N(0, 0.02) bf16 weights), replayed from a
CUDA graph: ms/token, tok/s and achieved GB/s of weight reads vs the weight-read floor.

Floor: weight bytes per token (all but the embedding table, 23.1 GB) / copy bandwidth measured in the same
run. Also: cuBLAS's achieved TB/s on every decoder GEMM shape at M=1 (the input to the GEMV decision) and
the sum of those GEMMs over 40 layers (what the step would cost if everything but the GEMMs were free).
Baseline: the previous decode path (Triton GEMV + separate norm/SiLU/add kernels, 'none') replayed in the same
run; gpt-fast style torch.compile decoder from ../shared/reference/performance.md (not re-run unless --gptfast).
Variants (STEP_VARIANTS; --variants a,b to pick): decode_fusion 'none' (timed twice: run-to-run spread),
'none+pdl', 'fused2' (SiLU-mul in the w13 GEMV), 'fused2+pdl' at 1k and 4k context. The old 'fused'/'pdl'
tile sweep runs only with --fused-sweep.
"""
import json
import sys
from collections.abc import Mapping

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench_ms, copy_bandwidth_TBps, device_name, record  # noqa: E402

from pixtral_rt.config import PIXTRAL_12B  # noqa: E402
from pixtral_rt.decoder import FastDecoder  # noqa: E402
from pixtral_rt.kernels.gemv import gemv, gemv_fused  # noqa: E402
from pixtral_rt.kernels.silu_mul import silu_mul  # noqa: E402

# fused-GEMV tile sweep (block_n, block_k, num_warps, num_stages) per shape; the first is the old default
FUSED_SWEEP = {
    "wqkv": [(8, 512, 4, 4), (4, 512, 4, 4), (8, 256, 4, 4), (16, 256, 4, 6)],
    "wo": [(16, 512, 4, 4), (4, 512, 4, 4), (8, 512, 4, 4), (8, 256, 4, 4)],
    "w13": [(16, 256, 4, 6), (16, 512, 4, 4), (32, 256, 8, 4)],
    "w2": [(8, 512, 4, 4), (8, 1024, 8, 3), (16, 512, 4, 4), (4, 1024, 4, 4)],
    "output": [(8, 1024, 8, 3), (16, 512, 4, 4)],
}
GEMV_CONFIGS = [(8, 512, 4, 4), (16, 512, 4, 4), (4, 1024, 4, 4), (8, 1024, 8, 3), (16, 256, 4, 6), (32, 256, 8, 4)]

GPTFAST_TOK_S = {"NVIDIA H100 80GB HBM3": 100.4, "NVIDIA H200": 119.6}  # performance.md, ctx 1k


class RandomWeights(Mapping):
    """Mistral-named state dict whose tensors are drawn on access (N(0, 0.02), norms ~1), so the fused
    decoder holds the only copy on the GPU."""

    def __init__(self, args):
        a = args
        self.shapes = {"tok_embeddings.weight": (a.vocab_size, a.dim), "norm.weight": (a.dim,),
                       "output.weight": (a.vocab_size, a.dim)}
        for i in range(a.n_layers):
            p = f"layers.{i}."
            self.shapes.update({
                p + "attention.wq.weight": (a.n_heads * a.head_dim, a.dim),
                p + "attention.wk.weight": (a.n_kv_heads * a.head_dim, a.dim),
                p + "attention.wv.weight": (a.n_kv_heads * a.head_dim, a.dim),
                p + "attention.wo.weight": (a.dim, a.n_heads * a.head_dim),
                p + "attention_norm.weight": (a.dim,), p + "ffn_norm.weight": (a.dim,),
                p + "feed_forward.w1.weight": (a.hidden_dim, a.dim),
                p + "feed_forward.w2.weight": (a.dim, a.hidden_dim),
                p + "feed_forward.w3.weight": (a.hidden_dim, a.dim)})

    def __getitem__(self, k):
        shape = self.shapes[k]
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(shape, device="cuda")).to(torch.bfloat16)
        return (torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02)

    def __contains__(self, k):
        return k in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def main():
    torch.manual_seed(0)
    copy_tb = copy_bandwidth_TBps()
    args = PIXTRAL_12B.text
    dec = FastDecoder(args, RandomWeights(args), max_batch=8, max_seq=4160)
    dec.k_cache.normal_()
    dec.v_cache.normal_()
    wbytes = dec.weight_bytes_per_token
    floor_ms = wbytes / copy_tb / 1e9
    print(f"copy {copy_tb:.2f} TB/s; weights/token {wbytes / 1e9:.2f} GB; floor {floor_ms:.2f} ms = "
          f"{1e3 / floor_ms:.1f} tok/s ({device_name()})")

    # fused Triton GEMV (prologue/epilogue as the decode step uses them) at M=1, small tile sweep; the plain
    # Triton GEMV with the decoder's current tiles (GEMV_CONFIGS) as the baseline of the same run
    L0 = dec.layers[0]
    d = args.dim
    # w13 GEMV + silu_mul (two launches) vs the GLU-epilogue GEMV ('fused2'), standalone
    xg = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    ms_two = bench_ms(lambda: silu_mul(gemv(xg, L0.w13, **dec.gemv_configs[tuple(L0.w13.shape)])), rep_ms=100)
    ms_glu = bench_ms(lambda: gemv(xg, L0.w13, glu=True, **dec.glu_config), rep_ms=100)
    record("decode_step", "w13_glu_gemv", "TB/s", L0.w13.numel() * 2 / ms_glu / 1e9, "TB/s", "w13_gemv+silu_mul",
           L0.w13.numel() * 2 / ms_two / 1e9, copy_tb, us=round(ms_glu * 1e3, 2), us_two=round(ms_two * 1e3, 2),
           config=dec.glu_config)
    if "--fused-sweep" in sys.argv:
        fused_sweep(dec, args, L0, d, copy_tb, floor_ms)
    run_steps(dec, args, wbytes, floor_ms)
    if "--gptfast" in sys.argv:
        import subprocess
        del dec
        torch.cuda.empty_cache()
        subprocess.run([sys.executable, "/work/shared/bench/gptfast_decode.py"], check=False)


def fused_sweep(dec, args, L0, d, copy_tb, floor_ms):
    """Old 'fused' path: gemv_fused tile sweep per shape vs the plain GEMV (sets dec.fused_gemv_configs)."""
    old_total = fused_total = 0.0
    best_cfgs = {}
    r = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    for name, w, count, kw in (("wqkv", L0.wqkv, 40, dict(norm_weight=L0.attention_norm)),
                               ("wo", L0.wo, 40, dict(residual=r)),
                               ("w13", L0.w13, 40, dict(norm_weight=L0.ffn_norm)),
                               ("w2", L0.w2, 40, dict(silu=True, residual=r)),
                               ("output", dec.output, 1, dict(norm_weight=dec.norm, out_dtype=torch.float32))):
        x = torch.randn(1, w.shape[1], device="cuda", dtype=torch.bfloat16)
        x2 = torch.randn(1, 2 * w.shape[1], device="cuda", dtype=torch.bfloat16) if kw.get("silu") else x
        ms = bench_ms(lambda: gemv(x, w, **dec.gemv_configs.get(tuple(w.shape), {})), rep_ms=100)
        old_total += ms * count
        best = None
        for bn, bk, nw, ns in FUSED_SWEEP[name]:
            cfg = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
            try:
                tms = bench_ms(lambda: gemv_fused(x2, w, **kw, **cfg), rep_ms=100)
            except Exception as exc:  # noqa: BLE001
                print(f"gemv_fused config {(bn, bk, nw, ns)} failed: {type(exc).__name__} {str(exc)[:150]}")
                continue
            if best is None or tms < best[0]:
                best = (tms, cfg)
        best_cfgs[tuple(w.shape)] = best[1]
        fused_total += best[0] * count
        record("decode_step", f"fused_gemv_{name}_{w.shape[0]}x{w.shape[1]}", "TB/s", w.numel() * 2 / best[0] / 1e9,
               "TB/s", "triton_gemv_plain", w.numel() * 2 / ms / 1e9, copy_tb, us=round(best[0] * 1e3, 2),
               us_plain=round(ms * 1e3, 2), config=best[1], fused=sorted(k for k in kw))
    record("decode_step", "sum_of_fused_gemvs_B1", "tok/s", 1e3 / fused_total, "tok/s", "sum_of_triton_gemvs_B1",
           1e3 / old_total, 1e3 / floor_ms, ms=round(fused_total, 3))
    dec.fused_gemv_configs = best_cfgs
    try:  # best decode-attention config from bench_decode_attention.py run just before (same machine)
        best_attn = json.load(open("/tmp/decode_best.json"))
        dec.decode_config = dict(block_n=best_attn[0], num_warps=best_attn[1], num_stages=best_attn[2])
        print(f"decode attention config from the sweep: {dec.decode_config}")
    except (OSError, ValueError):
        pass


# (fusion, context, rep_ms): 'none' timed twice at 1k (first and last) for the run-to-run spread
STEP_VARIANTS = [("none", 1000, 1000), ("none+pdl", 1000, 1000), ("fused2", 1000, 1000), ("fused2+pdl", 1000, 1000),
                 ("none", 1000, 1000), ("none", 4000, 600), ("none+pdl", 4000, 600), ("fused2", 4000, 600),
                 ("fused2+pdl", 4000, 600)]


def run_steps(dec, args, wbytes, floor_ms):
    gf = GPTFAST_TOK_S.get(device_name())
    variants = STEP_VARIANTS
    if "--variants" in sys.argv:
        keep = sys.argv[sys.argv.index("--variants") + 1].split(",")
        variants = [v for v in variants if v[0] in keep]
    res = {}
    B = 1
    for fusion, pos, rep in variants:
        dec.gemv_backend, dec.decode_fusion = "triton", fusion
        try:
            graph = dec.capture_decode(B)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            print(f"capture {fusion} ctx{pos} failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        tok = torch.randint(1000, args.vocab_size, (B,), device="cuda")
        positions = torch.full((B,), pos, device="cuda", dtype=torch.int32)
        graph.tokens.copy_(tok)
        graph.positions.copy_(positions)
        ms = bench_ms(graph.graph.replay, warmup_ms=100, rep_ms=rep)
        kv_bytes = B * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2 * (pos + 1)
        gbs = (wbytes + kv_bytes) / ms / 1e6
        base = res.get(("none", pos))
        rep_i = sum(1 for k in res if len(k) == 3 and k[0] == fusion and k[1] == pos)
        res[(fusion, pos, rep_i)] = B * 1e3 / ms
        if fusion == "none" and base is None:
            res[("none", pos)] = B * 1e3 / ms
        case = f"graph_triton{'' if fusion == 'none' else '_' + fusion}_B{B}_ctx{pos}" + (f"_rep{rep_i + 1}" if rep_i else "")
        record("decode_step", case, "tok/s", B * 1e3 / ms, "tok/s",
               f"graph_triton_B{B}_ctx{pos}" if base else "gptfast_style_ctx1k(performance.md)",
               base or gf, B * 1e3 / floor_ms, ms=round(ms, 4), GBps=round(gbs, 1),
               frac_of_floor=round(floor_ms / ms, 4), gptfast=gf)
        del graph
    print("=== decode step, graph-replayed, B=1 (tok/s; floor %.1f)" % (1e3 / floor_ms))
    for k, v in res.items():
        if len(k) == 3:
            print(f"  {k[0]:<12} ctx{k[1]:<5} rep{k[2] + 1}  {v:7.2f} tok/s  {v * floor_ms / 1e3:.3f} of floor")


if __name__ == "__main__":
    main()
