"""One batch-1 decode step of the engine that runs (LLMEngine: the model runner's CUDA graph of the paged
decode step + sampling, random Pixtral-12B weights drawn on the GPU), replayed: ms/token, tok/s and achieved
GB/s of weight + KV reads vs the weight-read floor.

Floor: weight bytes per token (all but the embedding table, 23.1 GB) / copy bandwidth measured in the same
run. Variants (STEP_VARIANTS; --variants a,b to pick): the decode paths FastDecoder keeps, decode_fusion
'none' (timed twice: run-to-run spread) and 'none+pdl' (the default), at 1k and 4k context; the graph is
recaptured per variant. Baseline: 'none' in the same run; gpt-fast style torch.compile decoder from
../shared/reference/performance.md. The fused-GEMV modes ('fused', 'pdl', 'fused2', 'fused2+pdl') lost
their measurements and were removed (docs/NOTES.md; results/decode_step.jsonl keeps them).

    python benchmarks/bench_decode_step.py [--variants none,none+pdl]
"""
import sys
from collections.abc import Mapping

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from common import bench_ms, copy_bandwidth_TBps, device_name, record  # noqa: E402

GPTFAST_TOK_S = {"NVIDIA H100 80GB HBM3": 100.4, "NVIDIA H200": 119.6}  # performance.md, ctx 1k
# (fusion, context, rep_ms): 'none' timed twice at 1k (first and last) for the run-to-run spread
STEP_VARIANTS = [("none", 1000, 1000), ("none+pdl", 1000, 1000), ("none", 1000, 1000), ("none", 4000, 600),
                 ("none+pdl", 4000, 600)]


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
    from pixtral_rt.serving.llm_engine import LLMEngine
    torch.manual_seed(0)
    copy_tb = copy_bandwidth_TBps()
    eng = LLMEngine.load(random_weights="Pixtral-12B-2409", max_batch=1, max_context=4160, kv_tokens=8192,
                         progress=False)
    try:
        run_steps(eng, copy_tb)
    finally:
        eng.shutdown()


def run_steps(eng, copy_tb):
    r = eng.runner
    dec, args, P = r.model.decoder, eng.args.text, eng.pool.page_size
    wbytes = dec.weight_bytes_per_token
    floor_ms = wbytes / copy_tb / 1e9
    print(f"copy {copy_tb:.2f} TB/s; weights/token {wbytes / 1e9:.2f} GB; floor {floor_ms:.2f} ms = "
          f"{1e3 / floor_ms:.1f} tok/s ({device_name()})")
    gf = GPTFAST_TOK_S.get(device_name())
    variants = STEP_VARIANTS
    if "--variants" in sys.argv:
        keep = sys.argv[sys.argv.index("--variants") + 1].split(",")
        variants = [v for v in variants if v[0] in keep]
    res = {}
    B = 1
    with torch.inference_mode():
        n = -(-4200 // P)                                  # one row, its own pages of random K/V
        r.block_table[0, :n] = torch.arange(1, 1 + n, dtype=torch.int32)
        dec.k_pages.normal_()
        dec.v_pages.normal_()
        r.tokens.random_(1000, args.vocab_size)
        r.active[:B] = 1
        for fusion, pos, rep in variants:
            dec.decode_fusion = fusion
            r._fwd_graphs.pop(B, None)                     # the forward graph is captured once per B: again
            r._capture(B, True, False, None)               # the runner's graphs of this path (greedy, no controls)
            fwd, smp = r._fwd_graphs[B][0], r._sample_graphs[(B, True, False)]

            def step():
                r.positions[:B] = pos                      # in the graph: position += 1; reset each replay
                fwd.replay()
                smp.replay()

            ms = bench_ms(step, warmup_ms=100, rep_ms=rep)
            kv_bytes = B * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2 * (pos + 1)
            gbs = (wbytes + kv_bytes) / ms / 1e6
            base = res.get(("none", pos))
            rep_i = sum(1 for k in res if len(k) == 3 and k[0] == fusion and k[1] == pos)
            res[(fusion, pos, rep_i)] = B * 1e3 / ms
            if fusion == "none" and base is None:
                res[("none", pos)] = B * 1e3 / ms
            case = (f"engine_graph{'' if fusion == 'none' else '_' + fusion}_B{B}_ctx{pos}"
                    + (f"_rep{rep_i + 1}" if rep_i else ""))
            record("decode_step", case, "tok/s", B * 1e3 / ms, "tok/s",
                   f"engine_graph_B{B}_ctx{pos}" if base else "gptfast_style_ctx1k(performance.md)",
                   base or gf, B * 1e3 / floor_ms, ms=round(ms, 4), GBps=round(gbs, 1),
                   frac_of_floor=round(floor_ms / ms, 4), gptfast=gf)
        r.active.zero_()
    print("=== decode step of the engine, graph-replayed, B=1 (tok/s; floor %.1f)" % (1e3 / floor_ms))
    for k, v in res.items():
        if len(k) == 3:
            print(f"  {k[0]:<12} ctx{k[1]:<5} rep{k[2] + 1}  {v:7.2f} tok/s  {v * floor_ms / 1e3:.3f} of floor")


if __name__ == "__main__":
    main()
