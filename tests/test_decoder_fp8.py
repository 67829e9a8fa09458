"""FastDecoder with FP8 decoder linears vs the FP8 reference math (pixtral_rt/reference/fp8_linear.py).

Scenario as in test_decoder_fast.py: sequences prefilled into cache slots (in chunks), then teacher-forced
decode steps. The reference runs the same math incrementally through its KV cache: prompt forwards quantise
activations per token; decode steps follow fp8_decode (pixtral_rt/options.py): "w8a16" under decode_mode (bf16
activations, FP8 weights), "w8a8" quantised as in prefill. Both modes are checked.
CPU: tiny model, fp32, Triton interpreter (FP8 GEMM on the Triton backend). GPU: full-size Pixtral-12B
decoder with random weights, bf16, FP8 GEMM on torch._scaled_mm, decode through CUDA graphs; tolerance:
the fast path's error vs the fp32 reference <= 2x the bf16 reference's own error (+ eps), i.e. the bf16
decoder test's rule; the FP8-vs-bf16 gap is printed as a quality figure (it is not a correctness test).
The comparisons are shared with int4 (tests/quantized_helpers.py); the cases, shapes and refusals are FP8's.
"""
import pytest
import torch

from pixtral_rt.config import tiny
from pixtral_rt.decoder import FastDecoder
from pixtral_rt.fp8 import Fp8Weight, quantize_weight
from pixtral_rt.reference.fp8_linear import Fp8Linear
from pixtral_rt.reference.transformer import Transformer
from tests.conftest import requires_gpu
from tests.quantized_helpers import (assert_fast_matches_reference, check_pixtral12b_vs_reference,
                                     quantize_state_dict, tiny_decoder_case, with_dense_linear)


def test_fp8_linear_is_the_formula():
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


@pytest.mark.parametrize("fp8_decode", ["auto", "w8a16", "w8a8"])
@pytest.mark.parametrize("gemv_backend,fusion,n_seqs", [("cublas", "none", 2), ("triton", "none+pdl", 1)])
def test_decoder_fp8_tiny_cpu_interpreter(device, gemv_backend, fusion, n_seqs, fp8_decode):
    """Decode: w8a16 the FP8-weight GEMV (B = 1, plain and the decode chain) / skinny GEMM (B = 2) on bf16
    activations; w8a8 the per-token quantiser + skinny FP8 tensor-core GEMM (the chain's RMSNorm writing the
    quantised rows). Prefill: the quantiser + the FP8 GEMM. fp32: the FP8 operands are exact, so fast and reference differ only by
    accumulation order (and, rarely, an activation landing on the other side of an e4m3 rounding tie)."""
    n_decode = 3
    args, model, sd, seqs = tiny_decoder_case(device, "fp8", (9, 14), n_seqs, n_decode)
    dec = FastDecoder(args, dict(sd), max_batch=2, max_seq=40, gemv_backend=gemv_backend,
                      decode_fusion=fusion, fp8_decode=fp8_decode)
    assert dec.fp8 and isinstance(dec.layers[0].wqkv, Fp8Weight) and dec.output.dtype == torch.float32
    assert_fast_matches_reference(dec, model, sd, "fp8", device, seqs, [[5]] * len(seqs), n_decode, fp8_decode)


def test_decoder_fp8_refuses_mixed(device):
    args = tiny(vocab_size=100).text
    model = Transformer(args)
    sd = quantize_state_dict(model.state_dict(), "fp8")
    mixed = with_dense_linear(sd, model.state_dict(), "layers.0.attention.wk.weight", "fp8")
    with pytest.raises(ValueError, match="mixes FP8"):
        FastDecoder(args, mixed, max_seq=16)
    bad = dict(sd)
    del bad["layers.1.feed_forward.w2.weight_scale"]
    with pytest.raises(ValueError, match="weight_scale"):
        FastDecoder(args, bad, max_seq=16)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fp8_decode", ["auto", "w8a16", "w8a8"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_fp8_pixtral12b_vs_fp8_reference(batch, fp8_decode):
    """Full-size 12B decoder, FP8: prefill (scaled_mm) + 24 decode steps replayed from a CUDA graph (B = 1:
    the decode chain with PDL; B = 2: the skinny GEMM) vs the FP8 reference in fp32, in both decode modes."""
    check_pixtral12b_vs_reference("fp8", batch, fp8_decode)
