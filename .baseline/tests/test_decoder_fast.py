"""pixtral_rt.decoder.FastDecoder vs the reference Transformer (pixtral_rt.reference.transformer).

Scenario (CPU tiny model in the interpreter, and full-size Pixtral-12B text decoder with N(0, 0.02) random
weights on the GPU): two sequences of different lengths prefilled into slots 0 and 1 (slot 1 in two calls:
multi-turn / chunked prefill over the cache), then teacher-forced decode steps with batch 2 (GPU: 32 steps,
through a captured CUDA graph). Logits of every step are compared with the reference's full causal forward.
Tolerance: error vs a higher-precision reference <= 2x the reference module's own error in the fast path's
dtype + eps.
"""
import copy
import dataclasses

import pytest
import torch

from pixtral_rt.config import PIXTRAL_12B, tiny
from pixtral_rt.decoder import FastDecoder
from pixtral_rt.reference.rope import text_rope_angles
from pixtral_rt.reference.transformer import Transformer
from tests.conftest import requires_gpu


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randomize(model, seed):
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.02)
            else:  # norm weights: not all ones, so a skipped multiply shows
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=p.device))


def run_fast(dec, seqs, splits, n_decode, graph=None):
    """seqs: token lists (prompt + n_decode tokens) per slot; splits: prefill chunk boundaries per slot.
    Returns per slot the logits (1 + n_decode, vocab): last prefill position, then each decode step."""
    out = [[] for _ in seqs]
    for b, (toks, cuts) in enumerate(zip(seqs, splits)):
        prompt_len = len(toks) - n_decode
        bounds = [0] + cuts + [prompt_len]
        for a, c in zip(bounds[:-1], bounds[1:]):
            t = torch.tensor(toks[a:c], device=dec.device)
            last = dec.prefill(dec.embed(t), b, a)
        out[b].append(last.float())
    for step in range(n_decode):
        # token fed at step `step` is the one at position prompt_len + step
        tok = torch.tensor([s[len(s) - n_decode + step] for s in seqs], device=dec.device)
        pos = torch.tensor([len(s) - n_decode + step for s in seqs], device=dec.device, dtype=torch.int32)
        logits = graph(tok, pos) if graph is not None else dec.decode_step(tok, pos)
        for b in range(len(seqs)):
            out[b].append(logits[b].float().clone())
    return [torch.stack(o) for o in out]


def ref_logits(model, seqs, n_decode, dtype=None):
    """Reference logits at positions prompt_len-1 .. end-1 per sequence. dtype: run each layer upcast
    to this dtype (one layer at a time, so full-size fp32 fits beside the bf16 model)."""
    res = []
    dev = next(model.parameters()).device
    args = model.args
    hs = [model.tok_embeddings(torch.tensor(s, device=dev)) for s in seqs]
    if dtype is None:
        with torch.no_grad():
            return [model(h)[-n_decode - 1:] for h in hs]
    hs = [h.to(dtype) for h in hs]
    with torch.no_grad():
        angles = [text_rope_angles(torch.arange(len(s), device=dev), args.head_dim, args.rope_theta) for s in seqs]
        for layer in model.layers:
            l32 = copy.deepcopy(layer).to(dtype)
            hs = [l32(h, a, 0, None, None) for h, a in zip(hs, angles)]
            del l32
        norm, out = copy.deepcopy(model.norm).to(dtype), model.output.weight.to(dtype)
        for h in hs:
            res.append((norm(h[-n_decode - 1:]) @ out.T).float())
    return res


@pytest.mark.parametrize("gemv_backend,fusion", [("cublas", "none"), ("triton", "none"), ("triton", "fused"),
                                                 ("triton", "none+pdl"), ("triton", "fused2"),
                                                 ("triton", "fused2+pdl")])
def test_decoder_tiny_cpu_interpreter(device, gemv_backend, fusion):
    args = tiny(vocab_size=1000).text
    torch.manual_seed(0)
    model = Transformer(args).to(device)
    randomize(model, 0)
    n_decode = 3
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (9 + n_decode, 14 + n_decode)]
    if gemv_backend == "triton":  # the Triton GEMV serves 1-row GEMMs: one sequence, so decode has B = 1
        seqs = seqs[1:]
    dec = FastDecoder.from_reference(model, max_batch=2, max_seq=40, prefill_chunk=6, gemv_backend=gemv_backend,
                                     decode_fusion=fusion)
    fast = run_fast(dec, seqs, splits=[[5]] * len(seqs), n_decode=n_decode)
    ref32 = ref_logits(model, seqs, n_decode)
    ref64 = ref_logits(model, seqs, n_decode, dtype=torch.float64)
    for f, r32, r64 in zip(fast, ref32, ref64):
        assert not torch.isnan(f).any()
        assert rel(f, r64) <= 2 * rel(r32, r64) + 1e-5, (rel(f, r64), rel(r32, r64))


def test_decoder_rejects_bad_weights(device):
    args = tiny(vocab_size=100).text
    sd = dict(Transformer(args).state_dict())
    good = sd["layers.0.attention.wk.weight"]
    sd["layers.0.attention.wk.weight"] = good[:-1]
    with pytest.raises(ValueError, match="layers.0.attention.wk.weight"):
        FastDecoder(args, sd, max_seq=16)
    sd["layers.0.attention.wk.weight"] = good
    del sd["norm.weight"]
    with pytest.raises(KeyError, match="norm.weight"):
        FastDecoder(args, sd, max_seq=16)


@requires_gpu
@pytest.mark.gpu
def test_decoder_pixtral12b_bf16_prefill_and_32_decode_steps():
    args = PIXTRAL_12B.text
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(old)
    randomize(model, 0)
    n_decode = 32
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1000, args.vocab_size, (n + n_decode,), generator=g).tolist() for n in (97, 40)]
    dec = FastDecoder.from_reference(model, max_batch=2, max_seq=512, gemv_backend="cublas")
    graph = dec.capture_decode(2)  # before prefill: capture warms up by writing slots 0..1 at position 0
    fast = run_fast(dec, seqs, splits=[[], [25]], n_decode=n_decode, graph=graph)
    ref16 = ref_logits(model, seqs, n_decode)
    ref32 = ref_logits(model, seqs, n_decode, dtype=torch.float32)
    for b, (f, r16, r32) in enumerate(zip(fast, ref16, ref32)):
        err, err_ref = rel(f, r32), rel(r16, r32)
        agree = (f.argmax(-1) == r32.argmax(-1)).float().mean().item()
        print(f"slot {b}: fast err {err:.3e}, reference-bf16 err {err_ref:.3e}, argmax agreement {agree:.2f}")
        assert not torch.isnan(f).any()
        assert err <= 2 * err_ref + 1e-3, (b, err, err_ref)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fusion,graph", [("none", False), ("fused", False), ("pdl", False), ("pdl", True),
                                          ("none+pdl", True), ("fused2", False), ("fused2", True),
                                          ("fused2+pdl", True)])
def test_decoder_full_width_2_layers_triton_gemv_bf16(fusion, graph):
    """Full-width shapes (dim 5120, ffn 14336, vocab 131072), 2 layers, batch 1, Triton GEMV path, each
    decode fusion (eager, and 'pdl' replayed from a CUDA graph)."""
    args = dataclasses.replace(PIXTRAL_12B.text, n_layers=2)
    with torch.device("cuda"):
        model = Transformer(args).to(torch.bfloat16)
    randomize(model, 1)
    n_decode = 8
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1000, args.vocab_size, (61 + n_decode,), generator=g).tolist()]
    dec = FastDecoder.from_reference(model, max_batch=1, max_seq=128, gemv_backend="triton", decode_fusion=fusion)
    assert dec.decode_fusion == fusion
    g = dec.capture_decode(1) if graph else None
    fast = run_fast(dec, seqs, splits=[[]], n_decode=n_decode, graph=g)
    ref16 = ref_logits(model, seqs, n_decode)
    ref32 = ref_logits(model, seqs, n_decode, dtype=torch.float32)
    err, err_ref = rel(fast[0], ref32[0]), rel(ref16[0], ref32[0])
    print(f"triton gemv 2-layer ({fusion}, graph={graph}): fast err {err:.3e}, reference-bf16 err {err_ref:.3e}")
    assert err <= 2 * err_ref + 1e-3


def test_decoder_bad_fusion(device):
    args = tiny(vocab_size=100).text
    with pytest.raises(ValueError, match="decode_fusion"):
        FastDecoder(args, dict(Transformer(args).state_dict()), max_seq=16, decode_fusion="bogus")


def _tiny_decode(device, fusion, graph=False):
    args = tiny(vocab_size=1000).text
    torch.manual_seed(0)
    model = Transformer(args).to(device)
    randomize(model, 4)
    dec = FastDecoder.from_reference(model, max_batch=1, max_seq=40, gemv_backend="triton", decode_fusion=fusion)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 1000, (13,), generator=g).tolist()]
    return run_fast(dec, seqs, splits=[[4]], n_decode=4)[0]


def test_decoder_chain_none_pdl_same_as_none(device):
    """'none+pdl' runs the 'none' kernels (on the CPU without PDL): identical logits; 'fused2' close to them."""
    a, b, c = (_tiny_decode(device, f) for f in ("none", "none+pdl", "fused2"))
    assert torch.equal(a, b)
    assert rel(c, a) < 1e-2 and not torch.isnan(c).any()


@requires_gpu
@pytest.mark.gpu
def test_decoder_full_width_none_pdl_bitwise_graph():
    """Full width, 2 layers, CUDA graph: 'none+pdl' logits == 'none' logits bit for bit (a PDL ordering race
    would show as a moving difference); every fusion agrees with 'none' to bf16 rounding."""
    args = dataclasses.replace(PIXTRAL_12B.text, n_layers=2)
    with torch.device("cuda"):
        model = Transformer(args).to(torch.bfloat16)
    randomize(model, 2)
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(1000, args.vocab_size, (45 + 6,), generator=g).tolist()]
    outs = {}
    for fusion in ("none", "none+pdl", "fused2", "fused2+pdl"):
        dec = FastDecoder.from_reference(model, max_batch=1, max_seq=128, gemv_backend="triton",
                                         decode_fusion=fusion)
        outs[fusion] = run_fast(dec, seqs, splits=[[]], n_decode=6, graph=dec.capture_decode(1))[0]
        del dec
    for f, o in outs.items():
        print(f"{f}: rel vs none {rel(o, outs['none']):.3e}")
    assert torch.equal(outs["none"], outs["none+pdl"])
    assert rel(outs["fused2"], outs["none"]) < 2e-2 and rel(outs["fused2+pdl"], outs["fused2"]) < 1e-6


def test_consume_frees_weights_and_changes_nothing():
    """consume=True pops every text weight from the dict while building; same decoder as without it."""
    import torch
    from pixtral_rt.config import tiny
    from pixtral_rt.decoder import FastDecoder
    from pixtral_rt.random_weights import random_state_dict
    args = tiny(vocab_size=512).text
    sd = {k: v for k, v in random_state_dict(tiny(vocab_size=512), seed=9, dtype=torch.float32).items()
          if not k.startswith(("vision_encoder.", "vision_language_adapter."))}
    keep = FastDecoder(args, dict(sd), max_seq=64)
    mine = dict(sd)
    eaten = FastDecoder(args, mine, max_seq=64, consume=True)
    assert mine == {}
    for a, b in zip(keep.layers, eaten.layers):
        assert torch.equal(a.wqkv, b.wqkv) and torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
    assert torch.equal(keep.output, eaten.output)
