"""pixtral_rt/int4.py: the packing, the RTN quantiser and the kernel layout byte-exact against plain
(loop / NumPy) implementations written from the formulas in its docstring; the compressed-tensors package's
own pack / unpack / quantize agree (test dependency); Int4Weight's contract (repack, scale narrowing, cat)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixtral_rt import int4
from tests.conftest import requires_gpu


# ---------------------------------------------------------------------------------------- plain oracles
def plain_pack(q: np.ndarray) -> np.ndarray:
    """q (N, K) ints in [-8, 7] -> (N, K / 8) int32: word j, nibble i = q[8j + i] + 8 (a loop per word)."""
    N, K = q.shape
    out = np.zeros((N, K // 8), dtype=np.int64)
    for n in range(N):
        for j in range(K // 8):
            word = 0
            for i in range(8):
                word |= (int(q[n, 8 * j + i]) + 8) << (4 * i)
            out[n, j] = word - (1 << 32) if word >= 1 << 31 else word
    return out.astype(np.int32)


def plain_bf16(x: np.float32) -> np.float32:
    """Round an fp32 value to bf16 (to nearest, ties to even), by its bits."""
    bits = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def plain_rtn(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The RTN formula of pixtral_rt/int4.py, one group at a time in NumPy fp32."""
    N, K = w.shape
    q = np.zeros((N, K), dtype=np.int8)
    s = np.zeros((N, K // group), dtype=np.float32)
    inv = np.float32(1.0 / 7.5)
    for n in range(N):
        for g in range(K // group):
            vals = w[n, g * group:(g + 1) * group].astype(np.float32)
            amax = np.float32(max(float(np.abs(vals).max()), 1e-12))
            sc = plain_bf16(np.float32(amax * inv))
            s[n, g] = sc
            q[n, g * group:(g + 1) * group] = np.clip(np.rint(vals / sc), -8, 7).astype(np.int8)
    return q, s


def plain_kernel_layout(q: np.ndarray, plane: int) -> np.ndarray:
    """Word b * P + j of a row, nibble i = q[b * 8P + i * P + j] + 8 (a loop per nibble)."""
    N, K = q.shape
    nib = np.zeros((N, K // 8, 8), dtype=np.int64)
    for n in range(N):
        for b in range(K // (8 * plane)):
            for i in range(8):
                for j in range(plane):
                    nib[n, b * plane + j, i] = int(q[n, b * 8 * plane + i * plane + j]) + 8
    words = (nib << (4 * np.arange(8))).sum(-1)
    return np.where(words >= 1 << 31, words - (1 << 32), words).astype(np.int32)


def awkward_weights(N: int, K: int, seed: int, group: int = int4.GROUP_SIZE) -> torch.Tensor:
    """Random (N, K) bf16 weights with the cases RTN must get right: a 40x outlier row, an all-zero group,
    and a group of exact half steps (ties, rounded to even)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[0] *= 40
    w[1, :group] = 0
    s0 = 3 / 256                                    # bf16-exact; amax 7.5 s0 makes the scale s0 again
    ties = (torch.arange(group) % 15 - 7.5) * s0    # -7.5 s0 .. 6.5 s0: every w / s is a half
    w[2, :group] = ties
    return w.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("N,K", [(1, 8), (5, 48), (13, 384)])
def test_pack_and_unpack_byte_exact(N, K):
    g = torch.Generator().manual_seed(N * K)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    packed = int4.pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (N, K // 8)
    assert np.array_equal(packed.numpy(), plain_pack(q.numpy()))
    assert torch.equal(int4.unpack(packed), q)
    # every nibble value appears somewhere, both signs of the int32 words too
    assert (packed < 0).any() or N * K < 64


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="K % 8"):
        int4.pack(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        int4.pack(torch.zeros(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        int4.unpack(torch.zeros(2, 2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("N,K,group", [(7, 256, 128), (4, 384, 128), (6, 96, 32)])
def test_rtn_byte_exact_against_plain(N, K, group):
    w = awkward_weights(N, K, seed=N + K, group=group)
    q, s = int4.quantize_weight(w, group)
    q0, s0 = plain_rtn(w.float().numpy(), group)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (N, K // group)
    assert np.array_equal(s.numpy(), s0)
    assert np.array_equal(q.numpy(), q0)
    assert torch.equal(s.bfloat16().float(), s)                      # scales are bf16 values
    assert q.min() >= -8 and q.max() <= 7 and (q == -8).any() and (q == 7).any()
    # the tie group: halves went to the even neighbour (a round-half-up quantiser fails here)
    if group == 128:
        assert torch.equal(q[2, :15], torch.tensor([-8, -6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6],
                                                   dtype=torch.int8))
        assert (q[1, :group] == 0).all() and s[1, 0] > 0             # the zero group: q = 0, a tiny scale
    packed, scale = int4.quantize_and_pack(w, group)
    assert np.array_equal(packed.numpy(), plain_pack(q0)) and torch.equal(scale, s)
    # dequantised: exactly q * s, within half a step of w (the positive extreme may clip by one more half)
    W = int4.dequantize(packed, scale, group)
    assert torch.equal(W, torch.from_numpy(q0.astype(np.float32) * np.repeat(s0, group, axis=1)))
    err = (W - w.float()).abs().view(N, -1, group) / s[..., None]
    assert err.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("chunk_rows", [1, 5])
def test_quantize_and_pack_chunks_rows_identically(chunk_rows):
    w = awkward_weights(37, 256, seed=5)
    want = int4.quantize_and_pack(w)
    got = int4.quantize_and_pack(w, chunk_rows=chunk_rows)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_quantize_refuses_groups_that_do_not_fit():
    with pytest.raises(ValueError, match="groups of 128"):
        int4.quantize_weight(torch.randn(2, 200))


# ---------------------------------------------------------------------------------------- kernel layout
@pytest.mark.parametrize("K,group,plane", [(256, 128, 32), (384, 128, 16), (1024, 128, 128), (5120, 128, 128),
                                           (14336, 128, 128), (512, 32, 32)])
def test_plane_width(K, group, plane):
    assert int4.plane_width(K, group) == plane


def test_plane_width_refuses():
    with pytest.raises(ValueError, match="multiple of 128"):
        int4.plane_width(200, 8)
    with pytest.raises(ValueError, match="groups of 96"):
        int4.plane_width(256, 96)


@pytest.mark.parametrize("N,K", [(3, 256), (5, 384), (2, 2048)])
def test_kernel_layout_byte_exact(N, K):
    g = torch.Generator().manual_seed(K)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    plane = int4.plane_width(K, 128)
    kl = int4.to_kernel_layout(int4.pack(q), plane)
    assert np.array_equal(kl.numpy(), plain_kernel_layout(q.numpy(), plane))
    assert torch.equal(int4.from_kernel_layout(kl, plane), int4.pack(q))


def test_int4_weight_contract():
    w = awkward_weights(20, 384, seed=9)
    packed, scale = int4.quantize_and_pack(w)
    iw = int4.Int4Weight.from_checkpoint(packed, scale, scale_dtype=torch.bfloat16)
    assert iw.shape == (20, 384) and iw.plane == 16 and iw.group_size == 128
    assert iw.scale.dtype == torch.bfloat16                            # bf16 holds the RTN scales exactly
    assert iw.nbytes() == 20 * 384 // 2 + 20 * 3 * 2
    assert torch.equal(iw.dequantize(), int4.dequantize(packed, scale))
    odd = scale * (1 + 2 ** -12)                                       # not bf16 values: kept fp32
    assert int4.Int4Weight.from_checkpoint(packed, odd, scale_dtype=torch.bfloat16).scale.dtype == torch.float32
    a = int4.Int4Weight.from_checkpoint(packed[:7], scale[:7])
    b = int4.Int4Weight.from_checkpoint(packed[7:], odd[7:])
    cat = int4.Int4Weight.cat([a, b])
    assert cat.shape == (20, 384) and torch.equal(cat.qweight, iw.qweight)
    assert torch.equal(cat.dequantize()[:7], iw.dequantize()[:7])
    with pytest.raises(ValueError, match="differ"):
        int4.Int4Weight.cat([a, int4.Int4Weight.from_checkpoint(*int4.quantize_and_pack(w[:, :256]))])


# ---------------------------------------------------------------------------------------- compressed-tensors
def test_matches_compressed_tensors_package():
    pytest.importorskip("compressed_tensors", reason="package compressed-tensors is not installed "
                                                     "(pip install compressed-tensors, in the test extra)")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    w = awkward_weights(9, 384, seed=3)
    q, s = int4.quantize_weight(w)
    assert torch.equal(int4.pack(q), pack_to_int32(q, 4))
    assert torch.equal(unpack_from_int32(int4.pack(q), 4, torch.Size(q.shape)), q)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    q_ct = quantize(w.float(), s, torch.zeros_like(s, dtype=torch.int8), args, dtype=torch.int8)
    assert torch.equal(q_ct, q)              # their quantize with our scales gives our integers
    assert torch.equal(dequantize(q, s, None, args), int4.dequantize(int4.pack(q), s))


@requires_gpu
@pytest.mark.gpu
def test_rtn_and_repack_on_gpu_equal_cpu():
    """The GPU quantiser (--random-weights / load-time int4 on the device) writes the CPU's bytes."""
    w = awkward_weights(3000, 5120, seed=11)
    p_cpu, s_cpu = int4.quantize_and_pack(w)
    p_gpu, s_gpu = int4.quantize_and_pack(w.cuda())
    assert torch.equal(p_gpu.cpu(), p_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
    kl = int4.to_kernel_layout(p_cpu, 128)
    assert torch.equal(int4.to_kernel_layout(p_gpu, 128).cpu(), kl)
