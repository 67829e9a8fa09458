"""FP8 (e4m3) numerics shared by the loader, the reference model and the fast decoder.

Scheme (the published `pixtral-12b-FP8-dynamic` one, compressed-tensors "float-quantized"):
  weights      per output channel, symmetric:  s_w[n] = max_k |W[n, k]| * (1/448),
               W8[n, k] = e4m3(W[n, k] / s_w[n])                 W8 (N, K) float8_e4m3fn, s_w (N, 1) fp32
  activations  per token, dynamic: s_x[t] = max_k |x[t, k]| * (1/448),
               x8[t, k] = e4m3(x[t, k] / s_x[t])                 x8 (T, K) float8_e4m3fn, s_x (T, 1) fp32
  prefill      y[t, n] = (sum_k x8[t, k] W8[n, k]) * s_x[t] * s_w[n]      (FP8 tensor cores)
  decode       RuntimeOptions.fp8_decode (pixtral_rt/options.py):
               "w8a16"            y[t, n] = (sum_k x[t, k] W8[n, k]) * s_w[n]   (bf16 activations, weights
                                                                          dequantised in registers)
               "w8a8"             the prefill formula (activations quantised per token at every step, the
                                  published checkpoint's own "dynamic" scheme; FP8 tensor-core skinny kernel)
               "auto" (default)   w8a16 for a decode step of one row, w8a8 for batches (options.fp8_decode_for)
e4m3(v): round to nearest even, after clamping to [-448, 448]. The scale multiplies by fp32(1/448) (what
torch's CUDA division by a Python scalar does, and its CPU multiply) and x / s is a correctly rounded
division, so the Triton kernels and this reference give the same bytes on the CPU and the GPU. A row of
zeros gets the scale EPS * (1/448).

Which weights: the text decoder's linears (attention wq/wk/wv/wo, feed_forward w1/w2/w3). The embedding
table, lm_head (`output`), the vision encoder and the adapter stay in bf16 (quantising the encoder has
given garbage image embeddings elsewhere).

State-dict contract (what the loader and the GPU random-weight generator produce, our key names):
  sd["layers.{i}.attention.wq.weight"]        float8_e4m3fn (N, K), HF q/k rows already un-permuted
  sd["layers.{i}.attention.wq.weight_scale"]  float32 (N, 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INV_FP8_MAX = 1.0 / FP8_MAX   # rounded to fp32 wherever it multiplies an fp32 tensor
EPS = 1e-12          # smallest amax used for a scale (an all-zero row)

_QUANTIZED = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


def is_quantized_weight(key: str) -> bool:
    """True for the decoder linears FP8 applies to (our key names, e.g. layers.3.attention.wq.weight)."""
    return _QUANTIZED.fullmatch(key) is not None


def scale_key(key: str) -> str:
    """layers.0.attention.wq.weight -> layers.0.attention.wq.weight_scale"""
    return key + "_scale"


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) any float dtype -> (W8 (N, K) float8_e4m3fn, s_w (N, 1) fp32), per output channel."""
    wf = w.float()
    scale = wf.abs().amax(dim=1, keepdim=True).clamp_min(EPS) * INV_FP8_MAX
    return (wf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@torch.no_grad()
def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (x8 (T, K) float8_e4m3fn, s_x (T, 1) fp32), per token (the reference of
    kernels/fp8_quant.py)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS) * INV_FP8_MAX
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) fp8, (N, 1) fp32 -> (N, K) fp32."""
    return w8.float() * scale.float().reshape(-1, 1)


@dataclass
class Fp8Weight:
    """A quantised linear as the fast decoder holds it: weight (N, K) float8_e4m3fn row-major, scale (N,)
    fp32 contiguous. `shape` mirrors a plain weight's so shape-keyed tables still work."""
    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()

    @classmethod
    def cat(cls, parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Row-concatenate (wq|wk|wv -> wqkv, w1|w3 -> w13): the scales follow their rows."""
        return cls(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]))
