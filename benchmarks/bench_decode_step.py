"""One full decode step of the Pixtral-12B text decoder (random N(0, 0.02) bf16 weights), replayed from a
CUDA graph: ms/token, tok/s and achieved GB/s of weight reads vs the weight-read floor.

Floor: weight bytes per token (all but the embedding table, 23.1 GB) / copy bandwidth measured in the same
run. Also: cuBLAS's achieved TB/s on every decoder GEMM shape at M=1 (the input to the GEMV decision) and
the sum of those GEMMs over 40 layers (what the step would cost if everything but the GEMMs were free).
Baseline: gpt-fast style torch.compile decoder, ../shared/reference/performance.md (not re-run here unless
--gptfast).
"""
import json
import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench_ms, device_name, record  # noqa: E402

from pixtral_rt.config import PIXTRAL_12B  # noqa: E402
from pixtral_rt.decoder import FastDecoder  # noqa: E402
from pixtral_rt.kernels.gemv import gemv  # noqa: E402

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
    n = 2 * 2 ** 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_tb = 2 * n / bench_ms(lambda: b.copy_(a)) / 1e9
    del a, b
    args = PIXTRAL_12B.text
    dec = FastDecoder(args, RandomWeights(args), max_batch=8, max_seq=4160)
    dec.k_cache.normal_()
    dec.v_cache.normal_()
    wbytes = dec.weight_bytes_per_token
    floor_ms = wbytes / copy_tb / 1e9
    print(f"copy {copy_tb:.2f} TB/s; weights/token {wbytes / 1e9:.2f} GB; floor {floor_ms:.2f} ms = "
          f"{1e3 / floor_ms:.1f} tok/s ({device_name()})")

    # cuBLAS vs the Triton GEMV at M=1 on every decoder GEMM shape
    L0 = dec.layers[0]
    gemm_ms_total = triton_ms_total = 0.0
    best_cfgs = {}
    for name, w, count in (("wqkv", L0.wqkv, 40), ("wo", L0.wo, 40), ("w13", L0.w13, 40), ("w2", L0.w2, 40),
                           ("output", dec.output, 1)):
        x = torch.randn(1, w.shape[1], device="cuda", dtype=torch.bfloat16)
        ms = bench_ms(lambda: F.linear(x, w), rep_ms=200)
        gemm_ms_total += ms * count
        record("decode_step", f"cublas_gemv_{name}_{w.shape[0]}x{w.shape[1]}", "TB/s", w.numel() * 2 / ms / 1e9,
               "TB/s", "copy_bw", copy_tb, copy_tb, us=round(ms * 1e3, 2))
        best = None
        for bn, bk, nw, ns in GEMV_CONFIGS:
            try:
                tms = bench_ms(lambda: gemv(x, w, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns), rep_ms=100)
            except Exception as exc:  # noqa: BLE001
                print(f"gemv config {(bn, bk, nw, ns)} failed: {type(exc).__name__} {str(exc)[:150]}")
                continue
            if best is None or tms < best[0]:
                best = (tms, dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns))
        best_cfgs[tuple(w.shape)] = best[1]
        triton_ms_total += best[0] * count
        record("decode_step", f"triton_gemv_{name}_{w.shape[0]}x{w.shape[1]}", "TB/s", w.numel() * 2 / best[0] / 1e9,
               "TB/s", "cublas_gemv", w.numel() * 2 / ms / 1e9, copy_tb, us=round(best[0] * 1e3, 2), config=best[1])
    record("decode_step", "sum_of_cublas_gemvs_B1", "tok/s", 1e3 / gemm_ms_total, "tok/s", "weight_read_floor",
           1e3 / floor_ms, 1e3 / floor_ms, ms=round(gemm_ms_total, 3))
    record("decode_step", "sum_of_triton_gemvs_B1", "tok/s", 1e3 / triton_ms_total, "tok/s", "sum_of_cublas_gemvs_B1",
           1e3 / gemm_ms_total, 1e3 / floor_ms, ms=round(triton_ms_total, 3))
    dec.gemv_configs = best_cfgs
    try:  # best decode-attention config from bench_decode_attention.py run just before (same machine)
        best_attn = json.load(open("/tmp/decode_best.json"))
        dec.decode_config = dict(block_n=best_attn[0], num_warps=best_attn[1], num_stages=best_attn[2])
        print(f"decode attention config from the sweep: {dec.decode_config}")
    except (OSError, ValueError):
        pass

    gf = GPTFAST_TOK_S.get(device_name())
    for backend, B, pos in (("cublas", 1, 1000), ("triton", 1, 1000), ("cublas", 1, 4000), ("triton", 1, 4000),
                            ("cublas", 8, 1000)):
        dec.gemv_backend = backend
        graph = dec.capture_decode(B)
        tok = torch.randint(1000, args.vocab_size, (B,), device="cuda")
        positions = torch.full((B,), pos, device="cuda", dtype=torch.int32)
        graph.tokens.copy_(tok)
        graph.positions.copy_(positions)
        ms = bench_ms(graph.graph.replay, warmup_ms=100, rep_ms=1000)
        kv_bytes = B * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2 * (pos + 1)
        gbs = (wbytes + kv_bytes) / ms / 1e6
        record("decode_step", f"graph_{backend}_B{B}_ctx{pos}", "tok/s", B * 1e3 / ms, "tok/s",
               "gptfast_style_ctx1k(performance.md)" if gf else None, gf, B * 1e3 / floor_ms, ms=round(ms, 4),
               GBps=round(gbs, 1), frac_of_floor=round(floor_ms / ms, 4))
        if B == 1 and pos == 1000 and backend == "cublas":
            eager = bench_ms(lambda: dec.decode_step(tok, positions), rep_ms=500)
            record("decode_step", "eager_B1_ctx1000", "tok/s", 1e3 / eager, "tok/s", "graph_cublas_B1_ctx1000",
                   1e3 / ms, 1e3 / floor_ms, ms=round(eager, 4))
        del graph
    if "--gptfast" in sys.argv:
        import subprocess
        del dec
        torch.cuda.empty_cache()
        subprocess.run([sys.executable, "/work/shared/bench/gptfast_decode.py"], check=False)


if __name__ == "__main__":
    main()
