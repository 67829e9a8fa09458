"""FastDecoder with int4 (W4A16) decoder linears vs the int4 reference math (pixtral_rt/reference/int4_linear.py:
W = q * s dequantised exactly, x @ W.T in fp32).

Scenario as in test_decoder_fast.py / test_decoder_fp8.py: sequences prefilled into cache slots (in chunks,
one longer than 64 rows so the prefill tiles run), then teacher-forced decode steps. CPU: tiny model, fp32,
Triton interpreter (int4 GEMV for batch 1 plain and in the PDL decode chain, the skinny GEMM for batch 2, the
prefill GEMM on both backends). GPU: full-size Pixtral-12B decoder with random weights, bf16, decode through
CUDA graphs; tolerance: the fast path's error vs the fp32 int4 reference <= 2x the bf16 int4 reference's own
error (+ eps), the bf16 decoder test's rule; the int4-vs-bf16 gap is printed as a quality figure (not a
correctness test). The comparisons are shared with FP8 (tests/quantized_helpers.py); the cases, shapes and
refusals are int4's."""
import pytest
import torch

from pixtral_rt import int4
from pixtral_rt.config import tiny
from pixtral_rt.decoder import FastDecoder
from pixtral_rt.int4 import Int4Weight
from pixtral_rt.reference.int4_linear import Int4Linear
from pixtral_rt.reference.transformer import Transformer
from tests.conftest import requires_gpu
from tests.quantized_helpers import (assert_fast_matches_reference, check_pixtral12b_vs_reference,
                                     quantize_state_dict, tiny_decoder_case, with_dense_linear)
from tests.test_decoder_fast import randomize


def test_int4_linear_is_the_formula():
    torch.manual_seed(0)
    w = torch.randn(24, 256) * 0.05
    packed, s = int4.quantize_and_pack(w)
    lin = Int4Linear(256, 24, 128)
    lin.weight_packed.data, lin.weight_scale.data = packed, s
    x = torch.randn(5, 256)
    q = int4.unpack(packed).double()
    W = q * s.double().repeat_interleave(128, dim=1)
    torch.testing.assert_close(lin(x), (x.double() @ W.T).float())
    assert (lin(x) - x @ w.T).abs().max() > 1e-4          # really quantised


@pytest.mark.parametrize("gemv_backend,fusion,n_seqs,prefill", [
    ("cublas", "none", 2, "triton"), ("triton", "none+pdl", 1, "triton"), ("triton", "none", 1, "dequant")])
def test_decoder_int4_tiny_cpu_interpreter(device, gemv_backend, fusion, n_seqs, prefill):
    """B = 2 decode runs the skinny int4 GEMM, B = 1 the int4 GEMV (plain and in the decode chain); prompt
    chunks of 5..72 rows run the skinny and the prefill tiles ("triton") or dequantise + matmul ("dequant").
    fp32: q * s is exact, so fast and reference differ only by summation order."""
    n_decode = 3
    args, model, sd, seqs = tiny_decoder_case(device, "int4", (9, 75), n_seqs, n_decode)
    splits = [[5]] * len(seqs) if len(seqs) == 2 else [[3]]      # the 78-token sequence: a 72-row chunk
    dec = FastDecoder(args, dict(sd), max_batch=2, max_seq=100, gemv_backend=gemv_backend, decode_fusion=fusion)
    dec.int4_prefill_backend = prefill
    assert dec.int4 and not dec.fp8 and isinstance(dec.layers[0].w13, Int4Weight)
    assert dec.layers[0].wqkv.shape == ((args.n_heads + 2 * args.n_kv_heads) * args.head_dim, args.dim)
    assert dec.output.dtype == torch.float32
    assert_fast_matches_reference(dec, model, sd, "int4", device, seqs, splits, n_decode)


def test_decoder_int4_weight_bytes_and_refusals(device):
    args = tiny(vocab_size=100).text
    model = Transformer(args)
    randomize(model, 1)
    sd = quantize_state_dict(model.state_dict(), "int4")
    dec = FastDecoder(args, dict(sd), max_seq=16)
    dense = FastDecoder(args, dict(model.state_dict()), max_seq=16)
    n = sum(v.numel() for k, v in model.state_dict().items() if int4.is_quantized_weight(k))
    # fp32 on the CPU: 4 bytes a weight dense; int4 half a byte + one fp32 scale per 128
    assert dense.weight_bytes_per_token - dec.weight_bytes_per_token == n * 4 - n // 2 - n // 128 * 4
    mixed = with_dense_linear(sd, model.state_dict(), "layers.0.attention.wk.weight", "int4")
    with pytest.raises(ValueError, match="mixes int4"):
        FastDecoder(args, mixed, max_seq=16)
    bad = dict(sd)
    del bad["layers.1.feed_forward.w2.weight_scale"]
    with pytest.raises(ValueError, match=r"w2\.weight_scale is missing"):
        FastDecoder(args, bad, max_seq=16)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_int4_pixtral12b_vs_int4_reference(batch):
    """Full-size 12B decoder, int4: prefill + 24 decode steps replayed from a CUDA graph (B = 1: the GEMV decode
    chain with PDL; B = 2: the skinny GEMM) vs the int4 reference in fp32."""
    check_pixtral12b_vs_reference("int4", batch)
