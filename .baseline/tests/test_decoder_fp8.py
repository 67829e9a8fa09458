"""FastDecoder with FP8 decoder linears vs the FP8 reference math (pixtral_rt/reference/fp8_linear.py).

Scenario as in test_decoder_fast.py: sequences prefilled into cache slots (in chunks), then teacher-forced
decode steps. The reference runs the same math incrementally through its KV cache: prompt forwards
quantise activations per token, decode steps run under decode_mode (bf16 activations, FP8 weights).
CPU: tiny model, fp32, Triton interpreter (FP8 GEMM on the Triton backend). GPU: full-size Pixtral-12B
decoder with random weights, bf16, FP8 GEMM on torch._scaled_mm, decode through CUDA graphs; tolerance:
the fast path's error vs the fp32 reference <= 2x the bf16 reference's own error (+ eps), i.e. the bf16
decoder test's rule; the FP8-vs-bf16 gap is printed as a quality figure (it is not a correctness test).
"""
import pytest
import torch

from pixtral_rt.config import PIXTRAL_12B, tiny
from pixtral_rt.decoder import FastDecoder
from pixtral_rt.fp8 import FP8_DTYPE, Fp8Weight, is_quantized_weight, quantize_weight, scale_key
from pixtral_rt.reference.fp8_linear import Fp8Linear, decode_mode, install_fp8_linears
from pixtral_rt.reference.transformer import KVCache, Transformer
from tests.conftest import requires_gpu
from tests.test_decoder_fast import randomize, rel, run_fast


def fp8_state_dict(model) -> dict:
    """The reference model's weights with every decoder linear quantised (the loader's contract)."""
    sd = {}
    for k, v in model.state_dict().items():
        if is_quantized_weight(k):
            sd[k], sd[scale_key(k)] = quantize_weight(v)
        else:
            sd[k] = v
    return sd


def fp8_reference(args, sd, device, dtype):
    with torch.device("meta"):
        m = Transformer(args)
    assert install_fp8_linears(m, sd) == 7 * args.n_layers
    m.load_state_dict({k: (v if v.dtype == FP8_DTYPE or k.endswith("_scale") else v.to(dtype)).to(device)
                       for k, v in sd.items()}, assign=True, strict=True)
    return m.eval()


@torch.no_grad()
def ref_incremental(model, seqs, splits, n_decode):
    """Per sequence: logits of the last prompt token (prompt forwards in the given chunks) then of each
    teacher-forced decode step (decode_mode): (1 + n_decode, vocab) fp32."""
    dev = model.tok_embeddings.weight.device
    out = []
    for toks, cuts in zip(seqs, splits):
        cache = KVCache.empty(model.args, len(toks), dev, model.tok_embeddings.weight.dtype)
        h = model.tok_embeddings(torch.tensor(toks, device=dev))
        P = len(toks) - n_decode
        bounds = [0] + cuts + [P]
        for a, c in zip(bounds[:-1], bounds[1:]):
            last = model(h[a:c], a, cache)[-1]
        rows = [last]
        with decode_mode(model):
            for p in range(P, len(toks)):
                rows.append(model(h[p:p + 1], p, cache)[-1])
        out.append(torch.stack(rows).float())
    return out


def test_fp8_linear_modes_are_the_formulas():
    torch.manual_seed(0)
    w8, s = quantize_weight(torch.randn(24, 40) * 0.05)
    lin = Fp8Linear(40, 24)
    lin.weight.data, lin.weight_scale.data = w8, s
    x = torch.randn(5, 40)
    from pixtral_rt.fp8 import quantize_activations
    x8, sx = quantize_activations(x)
    torch.testing.assert_close(lin(x), (x8.double() @ w8.double().T * sx.double() * s.double().T).float())
    lin.quantize_input = False
    torch.testing.assert_close(lin(x), (x.double() @ w8.double().T * s.double().T).float())


@pytest.mark.parametrize("gemv_backend,fusion,n_seqs", [("cublas", "none", 2), ("triton", "none+pdl", 1)])
def test_decoder_fp8_tiny_cpu_interpreter(device, gemv_backend, fusion, n_seqs):
    """B = 2 decode runs the skinny FP8 GEMM, B = 1 the FP8 GEMV (plain and the decode chain); prefill the
    per-token quantiser + FP8 GEMM. fp32: the FP8 operands are exact, so fast and reference differ only by
    accumulation order (and, rarely, an activation landing on the other side of an e4m3 rounding tie)."""
    args = tiny(vocab_size=1000).text
    torch.manual_seed(0)
    model = Transformer(args).to(device)
    randomize(model, 0)
    sd = fp8_state_dict(model)
    n_decode = 3
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (9 + n_decode, 14 + n_decode)][-n_seqs:]
    dec = FastDecoder(args, dict(sd), max_batch=2, max_seq=40, prefill_chunk=6, gemv_backend=gemv_backend,
                      decode_fusion=fusion)
    assert dec.fp8 and isinstance(dec.layers[0].wqkv, Fp8Weight) and dec.output.dtype == torch.float32
    fast = run_fast(dec, seqs, splits=[[5]] * len(seqs), n_decode=n_decode)
    ref = ref_incremental(fp8_reference(args, sd, device, torch.float32), seqs, [[5]] * len(seqs), n_decode)
    bf = ref_incremental(model.eval(), seqs, [[5]] * len(seqs), n_decode)     # the unquantised model
    for f, r, b in zip(fast, ref, bf):
        assert not torch.isnan(f).any()
        assert rel(f, r) < 1e-4, rel(f, r)
        assert torch.equal(f.argmax(-1), r.argmax(-1))
        assert rel(f, b) > 10 * rel(f, r)          # FP8 really ran: further from the bf16 model than from its ref


def test_decoder_fp8_refuses_mixed_and_fused(device):
    args = tiny(vocab_size=100).text
    model = Transformer(args)
    sd = fp8_state_dict(model)
    with pytest.raises(ValueError, match="decode_fusion"):
        FastDecoder(args, dict(sd), max_seq=16, gemv_backend="triton", decode_fusion="fused2")
    mixed = dict(sd)
    mixed["layers.0.attention.wk.weight"] = model.state_dict()["layers.0.attention.wk.weight"]
    del mixed["layers.0.attention.wk.weight_scale"]
    with pytest.raises(ValueError, match="mixes FP8"):
        FastDecoder(args, mixed, max_seq=16)
    bad = dict(sd)
    del bad["layers.1.feed_forward.w2.weight_scale"]
    with pytest.raises(ValueError, match="weight_scale"):
        FastDecoder(args, bad, max_seq=16)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_fp8_pixtral12b_vs_fp8_reference(batch):
    """Full-size 12B decoder, FP8: prefill (scaled_mm) + 24 decode steps replayed from a CUDA graph (B = 1:
    the GEMV decode chain with PDL; B = 2: the skinny GEMM) vs the FP8 reference in fp32."""
    args = PIXTRAL_12B.text
    with torch.device("cuda"):
        model = Transformer(args).to(torch.bfloat16)
    randomize(model, 0)
    sd = fp8_state_dict(model)
    bf_sd = {k: v for k, v in model.state_dict().items()}
    n_decode = 24
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1000, args.vocab_size, (n + n_decode,), generator=g).tolist() for n in (97, 300)][:batch]
    splits = [[40]] * batch
    dec = FastDecoder(args, dict(sd), max_batch=batch, max_seq=512)
    graph = dec.capture_decode(batch)
    fast = run_fast(dec, seqs, splits, n_decode, graph=graph)
    del graph, dec
    ref16 = ref_incremental(fp8_reference(args, sd, "cuda", torch.bfloat16), seqs, splits, n_decode)
    ref32 = ref_incremental(fp8_reference(args, sd, "cuda", torch.float32), seqs, splits, n_decode)
    del model
    torch.cuda.empty_cache()
    dec_bf = FastDecoder(args, bf_sd, max_batch=batch, max_seq=512)
    bf = run_fast(dec_bf, seqs, splits, n_decode)
    for b, (f, r16, r32, x) in enumerate(zip(fast, ref16, ref32, bf)):
        err, err_ref = rel(f, r32), rel(r16, r32)
        print(f"seq {b}: FP8 fast vs FP8 ref32 {err:.3e} (ref bf16 {err_ref:.3e}); FP8 vs bf16 decoder "
              f"{rel(f, x):.3e}, argmax agreement {(f.argmax(-1) == x.argmax(-1)).float().mean():.2f}")
        assert not torch.isnan(f).any()
        assert err <= 2 * err_ref + 1e-3, (b, err, err_ref)
