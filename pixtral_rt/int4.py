"""Int4 weight-only (W4A16) numerics shared by the loader, the reference model and the fast decoder.

Scheme (compressed-tensors "pack-quantized", the W4A16 preset llm-compressor writes for GPTQ and RTN):
  weights      symmetric int4, one scale per output row and group of G (= GROUP_SIZE, 128) inputs:
                   q[n, k] in [-8, 7]   int                        q (N, K)
                   s[n, g]              g = k // G                 s (N, K / G), fp32 (bf16 values)
                   W[n, k] = q[n, k] * s[n, k // G]                exact in fp32 (<= 12 significant bits)
  activations  as they are (bf16 on the GPU): no activation quantisation ("A16")
  y[t, n]    = sum_k x[t, k] W[n, k]                               fp32 accumulation everywhere

Round to nearest (quantize_weight; what quantization="int4" does at load, tensor by tensor):
  amax[n, g] = max_{k in group g} |w[n, k]|
  s[n, g]    = bf16( max(amax, EPS) * fp32(1 / 7.5) )        compressed-tensors' symmetric min-max scale,
                                                              amax / ((qmax - qmin) / 2); rounded to bf16
                                                              (the dtype the checkpoint stores) BEFORE q is
                                                              computed from it, so W = q * s holds exactly
  q[n, k]    = clamp( round_half_even(w[n, k] / s[n, g]), -8, 7 )
The multiply by fp32(1/7.5) (not a division by 7.5) and the correctly rounded w / s give the same bytes on
the CPU and the GPU (torch divides a CUDA tensor by a Python scalar as a multiply by its reciprocal).

Checkpoint packing (pack / unpack; compressed-tensors' pack_to_int32 with num_bits 4, every version):
  weight_packed int32 (N, K / 8): word j of row n holds q[n, 8j + i] + 8 in bits 4i .. 4i+3 (i = 0..7); the
  offset 8 makes each nibble unsigned 0..15 (vLLM calls the type uint4b8). Little-endian: byte b of a row is
  (q[2b] + 8) | (q[2b + 1] + 8) << 4, which is how pack / unpack build it (a view of the bytes as int32).
  weight_scale (N, K / G) in the checkpoint's float dtype; weight_shape int [2] = (N, K).

Kernel layout (to_kernel_layout; Int4Weight.from_checkpoint does it once, at load): same shape (N, K / 8)
int32 and the same bytes per row, nibbles permuted inside blocks of 8 P consecutive inputs:
  word b * P + j of row n, nibble i  =  q[n, b * 8P + i * P + j] + 8          (i = 0..7, j = 0..P-1)
  P ("plane" width) = min(128, G, the largest power of two dividing K / 8)   (K = 5120, G = 128: P = 128)
Why: the kernels load a (rows, P) tile of words and take nibble i of every word with one shift and mask; that
is the "plane" of P CONSECUTIVE inputs x[b*8P + i*P : b*8P + (i+1)*P], so it multiplies a contiguous slice
of x (or feeds tl.dot as is) with no register shuffle; in the checkpoint order a word holds 8 neighbouring
inputs, which a kernel would have to interleave. P divides G, so a plane lies inside one group: one scale
per row per plane. Rows stay contiguous (K / 2 bytes), so a tile's loads are coalesced. Requires K % 128 == 0
and K % G == 0 (all Pixtral decoder linears: K = 4096, 5120, 12288, 14336, 28672).

Which weights: the text decoder's linears (attention wq/wk/wv/wo, feed_forward w1/w2/w3), as for FP8.

State-dict contract (what the loader and the GPU random-weight generator produce, our key names):
  sd["layers.{i}.attention.wq.weight_packed"]  int32 (N, K / 8), checkpoint packing, HF q/k rows un-permuted
  sd["layers.{i}.attention.wq.weight_scale"]   float32 (N, K / G)
(no `.weight`; weight_shape is checked while planning and not kept).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .fp8 import is_quantized_weight  # noqa: F401  (the same decoder linears; re-exported for the int4 callers)

GROUP_SIZE = 128        # inputs per scale (compressed-tensors' W4A16 preset)
PACK = 8                # int4 values per int32 word
OFFSET = 8              # stored nibble = q + 8
QMIN, QMAX = -8, 7
INV_HALF_RANGE = 1.0 / 7.5   # 1 / ((QMAX - QMIN) / 2); rounded to fp32 where it multiplies an fp32 tensor
EPS = 1e-12             # smallest amax used for a scale (an all-zero group)
SCALE_DTYPE = torch.bfloat16  # RTN scales are rounded to this (and written in it)


def packed_key(key: str) -> str:
    """layers.0.attention.wq.weight -> layers.0.attention.wq.weight_packed"""
    return key + "_packed"


def scale_key(key: str) -> str:
    """layers.0.attention.wq.weight -> layers.0.attention.wq.weight_scale"""
    return key + "_scale"


def shape_key(key: str) -> str:
    """layers.0.attention.wq.weight -> layers.0.attention.wq.weight_shape"""
    return key + "_shape"


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("int4 packing views bytes as int32 and needs a little-endian host")


# ---------------------------------------------------------------------------------------- packing
def pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 in [-8, 7], K % 8 == 0 -> (N, K / 8) int32 in the checkpoint packing (see the docstring)."""
    _check_little_endian()
    if q.dim() != 2 or q.shape[1] % PACK or q.dtype != torch.int8:
        raise ValueError(f"int4 pack: expected (N, K) int8 with K % 8 == 0, got {tuple(q.shape)} {q.dtype}")
    u = (q + OFFSET).to(torch.uint8)                               # (N, K) 0..15
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous().view(torch.int32)   # (N, K/2) bytes -> (N, K/8)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 8) int32 in the checkpoint packing -> q (N, K) int8 in [-8, 7]."""
    _check_little_endian()
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"int4 unpack: expected (N, K / 8) int32, got {tuple(packed.shape)} {packed.dtype}")
    b = packed.contiguous().view(torch.uint8)                      # (N, K/2)
    u = torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], -1)  # (N, K) 0..15
    return u.view(torch.int8) - OFFSET


# ---------------------------------------------------------------------------------------- quantisation
def check_groups(K: int, group_size: int, what: str = "int4") -> None:
    if group_size <= 0 or K % group_size or K % PACK:
        raise ValueError(f"{what}: {K} inputs do not split into groups of {group_size} (and words of 8)")


@torch.no_grad()
def quantize_weight(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) any float dtype -> (q (N, K) int8 in [-8, 7], s (N, K / G) fp32 holding bf16 values): RTN."""
    N, K = w.shape
    check_groups(K, group_size, "int4 quantize_weight")
    wf = w.float().view(N, K // group_size, group_size)           # (N, G, group)
    amax = wf.abs().amax(dim=-1)                                   # (N, G)
    s = (amax.clamp_min(EPS) * INV_HALF_RANGE).to(SCALE_DTYPE).float()
    q = torch.round(wf / s[..., None]).clamp_(QMIN, QMAX).to(torch.int8)
    return q.view(N, K), s


def quantize_and_pack(w: torch.Tensor, group_size: int = GROUP_SIZE, chunk_rows: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (weight_packed (N, K / 8) int32, weight_scale (N, K / G) fp32): the loader's contract.
    Rows are quantised chunk_rows at a time (default: ~256 MB of fp32 per chunk), which bounds the fp32
    transients (a 28672 x 12288 matrix would need several GB at once); rows are independent."""
    N, K = w.shape
    rows = chunk_rows or max(1, (64 << 20) // max(1, K))
    packed = torch.empty(N, K // PACK, dtype=torch.int32, device=w.device)
    scale = torch.empty(N, K // group_size, dtype=torch.float32, device=w.device)
    for a in range(0, N, rows):
        q, s = quantize_weight(w[a:a + rows], group_size)
        packed[a:a + rows] = pack(q)
        scale[a:a + rows] = s
    return packed, scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """(N, K / 8) int32 (checkpoint packing), (N, K / G) scales -> W (N, K) fp32, exactly q * s.
    group_size None: K / scale.shape[1]."""
    q = unpack(packed).float()                                     # (N, K)
    N, K = q.shape
    G = scale.shape[1]
    group_size = group_size or K // G
    if scale.shape != (N, K // group_size) or K % group_size:
        raise ValueError(f"int4 dequantize: scale {tuple(scale.shape)} does not match weights ({N}, {K}) in "
                         f"groups of {group_size}")
    return (q.view(N, G, group_size) * scale.float()[..., None]).view(N, K)


# ---------------------------------------------------------------------------------------- kernel layout
def plane_width(K: int, group_size: int) -> int:
    """P of the kernel layout: min(128, G, largest power of two dividing K / 8); ValueError if K % 128 or the
    groups do not fit (P must divide G, so a plane has one scale)."""
    if K % 128:
        raise ValueError(f"int4 kernel layout: K = {K} is not a multiple of 128")
    check_groups(K, group_size, "int4 kernel layout")
    words = K // PACK
    p = min(128, group_size, words & -words)
    if p < 16 or group_size % p:
        raise ValueError(f"int4 kernel layout: group size {group_size} and K = {K} give no plane width "
                         f"(a power of two >= 16 dividing both)")
    return p


def to_kernel_layout(packed: torch.Tensor, plane: int) -> torch.Tensor:
    """(N, K / 8) int32 checkpoint packing -> the same shape in the kernel layout (see the docstring)."""
    N, W = packed.shape
    K = W * PACK
    nib = unpack(packed).view(N, K // (PACK * plane), PACK, plane)   # [n, b, i, j] = q[n, b*8P + i*P + j]
    return pack(nib.transpose(-1, -2).reshape(N, K))                 # word (b, j) holds nibbles i = 0..7


def from_kernel_layout(qweight: torch.Tensor, plane: int) -> torch.Tensor:
    """Inverse of to_kernel_layout."""
    N, W = qweight.shape
    K = W * PACK
    nib = unpack(qweight).view(N, K // (PACK * plane), plane, PACK)  # [n, b, j, i]
    return pack(nib.transpose(-1, -2).reshape(N, K))


@dataclass
class Int4Weight:
    """A quantised linear as the fast decoder holds it: qweight (N, K / 8) int32 in the kernel layout (plane
    width `plane`), scale (N, K / group_size) fp32 or bf16, contiguous. `shape` is the dense (N, K), so
    shape-keyed tile tables still work."""
    qweight: torch.Tensor
    scale: torch.Tensor
    group_size: int
    plane: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qweight.shape[0], self.qweight.shape[1] * PACK))

    def nbytes(self) -> int:
        return self.qweight.numel() * 4 + self.scale.numel() * self.scale.element_size()

    @classmethod
    def from_checkpoint(cls, packed: torch.Tensor, scale: torch.Tensor, device=None,
                        scale_dtype: torch.dtype | None = None) -> "Int4Weight":
        """From the loader's contract (checkpoint packing, fp32 scales): repacked into the kernel layout on
        `device`. scale_dtype (e.g. bf16 on the GPU: half the scale bytes) is used only if it holds every
        scale exactly; otherwise the scales stay fp32."""
        packed = packed.to(device)
        scale = scale.to(device, torch.float32)
        N, W = packed.shape
        K = W * PACK
        if scale.dim() != 2 or scale.shape[0] != N or K % scale.shape[1]:
            raise ValueError(f"Int4Weight: scale {tuple(scale.shape)} does not fit weights ({N}, {K})")
        group_size = K // scale.shape[1]
        plane = plane_width(K, group_size)
        if scale_dtype is not None and scale_dtype != torch.float32:
            narrow = scale.to(scale_dtype)
            if torch.equal(narrow.float(), scale):
                scale = narrow
        return cls(to_kernel_layout(packed, plane), scale.contiguous(), group_size, plane)

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32, exactly q * s (tests and the reference)."""
        return dequantize(from_kernel_layout(self.qweight, self.plane), self.scale, self.group_size)

    @classmethod
    def cat(cls, parts: list["Int4Weight"]) -> "Int4Weight":
        """Row-concatenate (wq|wk|wv -> wqkv, w1|w3 -> w13): rows are independent in the kernel layout."""
        if len({(p.group_size, p.plane, p.shape[1]) for p in parts}) != 1:
            raise ValueError("Int4Weight.cat: parts differ in inputs, group size or plane width")
        dtype = parts[0].scale.dtype if len({p.scale.dtype for p in parts}) == 1 else torch.float32
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scale.to(dtype) for p in parts]),
                   parts[0].group_size, parts[0].plane)


def check_kernel_weight(w: Int4Weight, K: int, who: str) -> None:
    """The Int4Weight contract the int4 kernels rely on (shapes, dtypes, contiguity, plane width)."""
    if not isinstance(w, Int4Weight):
        raise ValueError(f"{who}: expected an Int4Weight, got {type(w).__name__}")
    qw, s = w.qweight, w.scale
    if qw.dim() != 2 or qw.dtype != torch.int32 or not qw.is_contiguous():
        raise ValueError(f"{who}: expected a contiguous (N, K / 8) int32 qweight, got {tuple(qw.shape)} {qw.dtype}")
    N, Kw = w.shape
    if Kw != K:
        raise ValueError(f"{who}: x has {K} inputs but the weight ({N}, {Kw}) takes {Kw}")
    if (s.shape != (N, K // w.group_size) or s.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or not s.is_contiguous()):
        raise ValueError(f"{who}: scale must be contiguous ({N}, {K // w.group_size}) fp32/bf16/fp16, got "
                         f"{tuple(s.shape)} {s.dtype}")
    if K % (8 * w.plane) or w.group_size % w.plane or w.plane < 16 or w.plane & (w.plane - 1):
        raise ValueError(f"{who}: plane width {w.plane} does not fit K = {K} and group size {w.group_size}")
