"""Copied from ../shared/bench/gptfast_decode.py (the anchor the targets are stated against), unchanged but for
this docstring and the provenance fields of its output line (device, date, commit: the anchor lines of
earlier runs in benchmarks/results/logs/ lack them; the e2e.jsonl lines of the same call carry them), so the
anchor runs in the same GPU call as our benchmarks.

Anchor: gpt-fast-style decode of the Pixtral-12B text decoder (Mistral-NeMo shape) in plain PyTorch:
static KV cache, torch.compile(mode="reduce-overhead") of one decode step (CUDA graphs), random weights.
Measures what stock PyTorch reaches without custom kernels. Not project code."""
import json, os, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F

torch._inductor.config.coordinate_descent_tuning = True
torch._inductor.config.triton.unique_kernel_names = True
torch._inductor.config.fx_graph_cache = True

DIM, LAYERS, HEADS, KV, HD, FFN, VOCAB = 5120, 40, 32, 8, 128, 14336, 131072
MAXSEQ = 2048
OUT = os.environ.get("OUT", "/tmp")


def rope_tables(theta=1e9):
    inv = 1.0 / (theta ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    t = torch.arange(MAXSEQ, dtype=torch.float32)
    f = torch.outer(t, inv)
    return torch.stack([f.cos(), f.sin()], -1).cuda()  # (S, HD/2, 2)


def apply_rope(x, fc):  # x (B, S, H, HD), fc (S, HD/2, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = fc.view(1, xs.size(1), 1, xs.size(3), 2)
    o = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                     xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return o.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__(); self.weight = nn.Parameter(torch.ones(d))
    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * self.weight


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wqkv = nn.Linear(DIM, (HEADS + 2 * KV) * HD, bias=False)
        self.wo = nn.Linear(HEADS * HD, DIM, bias=False)
        self.w13 = nn.Linear(DIM, 2 * FFN, bias=False)
        self.w2 = nn.Linear(FFN, DIM, bias=False)
        self.n1, self.n2 = RMSNorm(DIM), RMSNorm(DIM)
        self.register_buffer("k_cache", torch.zeros(1, KV, MAXSEQ, HD, dtype=torch.bfloat16))
        self.register_buffer("v_cache", torch.zeros(1, KV, MAXSEQ, HD, dtype=torch.bfloat16))

    def forward(self, x, fc, pos, mask):
        B, S, _ = x.shape
        q, k, v = self.wqkv(self.n1(x)).split([HEADS * HD, KV * HD, KV * HD], -1)
        q = apply_rope(q.view(B, S, HEADS, HD), fc).transpose(1, 2)
        k = apply_rope(k.view(B, S, KV, HD), fc).transpose(1, 2)
        v = v.view(B, S, KV, HD).transpose(1, 2)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(o.transpose(1, 2).reshape(B, S, HEADS * HD))
        g, u = self.w13(self.n2(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(MAXSEQ, MAXSEQ, dtype=torch.bool)))

    def forward(self, ids, pos, fc_all):
        x = self.emb(ids)
        fc = fc_all[pos]
        mask = self.causal[None, None, pos]
        for l in self.layers:
            x = l(x, fc, pos, mask)
        return self.out(self.norm(x[:, -1:]))


def main():
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = Decoder().to(torch.bfloat16)
    for p in m.parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    fc = rope_tables()
    wbytes = sum(p.numel() * 2 for n, p in m.named_parameters() if not n.startswith("emb"))
    res = {"weight_GB_per_token": round(wbytes / 1e9, 2)}

    @torch.inference_mode()
    def prefill(ids):
        pos = torch.arange(ids.shape[1], device="cuda")
        return m(ids, pos, fc)

    def decode_one(tok, pos):
        return m(tok, pos, fc)

    step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(1000, 100000, (1, 1000), device="cuda")
    t0 = time.time()
    with torch.inference_mode():
        logits = prefill(ids)
        tok = logits.argmax(-1)
        for i in range(3):  # compile + capture
            tok = step(tok.view(1, 1), torch.tensor([1000 + i], device="cuda")).argmax(-1)
    torch.cuda.synchronize()
    res["compile_s"] = round(time.time() - t0, 1)
    for rep in range(3):
        n = 256
        with torch.inference_mode():
            torch.cuda.synchronize(); t = time.time()
            for i in range(n):
                torch.compiler.cudagraph_mark_step_begin()
                tok = step(tok.view(1, 1), torch.tensor([1003 + i], device="cuda")).argmax(-1)
            torch.cuda.synchronize(); dt = time.time() - t
        res[f"rep{rep}_tok_s"] = round(n / dt, 1)
        res[f"rep{rep}_GBps"] = round(wbytes * n / dt / 1e9, 0)
    import datetime
    res.update(device=torch.cuda.get_device_name(), commit=os.environ.get("PIXTRAL_RT_COMMIT", "unknown"),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    print(json.dumps({"name": "gptfast_style_decode_ctx1k", **res}), flush=True)
    with open(os.path.join(OUT, "gptfast.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
