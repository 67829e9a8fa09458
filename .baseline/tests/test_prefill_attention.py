"""kernels/prefill_attention.py vs the reference (reference.rope + reference.attention.causal_attention).

Checks: RoPE (interleaved pairs, fp32 angles) on q and k, k/v written to the right cache slot/positions
(other slots and later positions untouched), causal attention over cached + new tokens.
Tolerance: error vs the fp32 reference <= 2x PyTorch's own same-dtype error + eps. Cache tail, other slots
and the output are poisoned with NaN. CPU (interpreter): fp16/fp32, small shapes; GPU: bf16, T up to 4097.
"""

import pytest
import torch

from pixtral_rt.kernels.prefill_attention import prefill_attention, rope_table
from pixtral_rt.reference.attention import causal_attention
from pixtral_rt.reference.rope import apply_rope, text_rope_angles
from tests.conftest import requires_gpu

THETA = 1e9


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def lowp_causal_attention(q, k, v):
    """PyTorch in q's dtype end to end (the 'same-dtype' yardstick): q (T,Hq,D), k/v (S,Hkv,D)."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    rep = Hq // Hkv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * (D ** -0.5)
    mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", p, v)


def run_case(device, dtype, T, start_pos, hq=4, hkv=2, D=128, slots=3, slot=1, max_seq=None, config=None, seed=0):
    torch.manual_seed(seed + 1000 * T + start_pos)
    max_seq = max_seq or (start_pos + T + 19)
    cs = rope_table(max_seq, D, THETA, device)
    kc = torch.full((slots, hkv, max_seq, D), float("nan"), device=device, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    # tokens already in the cache (rotated K, as the kernel stores them)
    k_old = torch.randn(start_pos, hkv, D, device=device, dtype=dtype)
    v_old = torch.randn(start_pos, hkv, D, device=device, dtype=dtype)
    kc[slot, :, :start_pos] = k_old.transpose(0, 1)
    vc[slot, :, :start_pos] = v_old.transpose(0, 1)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=device, dtype=dtype)
    q, k, v = qkv.float().split([hq * D, hkv * D, hkv * D], -1)
    ang = text_rope_angles(torch.arange(start_pos, start_pos + T, device=device), D, THETA)
    q_rot = apply_rope(q.view(T, hq, D), ang)
    k_rot = apply_rope(k.view(T, hkv, D), ang)
    v = v.view(T, hkv, D)
    out = torch.full((T, hq, D), float("nan"), device=device, dtype=dtype)
    prefill_attention(qkv, kc, vc, slot, start_pos, cs, hq, hkv, out=out, config=config)
    # cache writes: rotated k (one rounding), v copied, nothing else touched
    assert rel(kc[slot, :, start_pos:start_pos + T].transpose(0, 1), k_rot) <= 2 * rel(k_rot.to(dtype), k_rot) + 1e-6
    assert torch.equal(vc[slot, :, start_pos:start_pos + T].transpose(0, 1), v.to(dtype))
    assert torch.isnan(kc[slot, :, start_pos + T:]).all() and torch.isnan(vc[slot, :, start_pos + T:]).all()
    for other in range(slots):
        if other != slot:
            assert torch.isnan(kc[other]).all() and torch.isnan(vc[other]).all()
    # attention
    K = torch.cat([k_old.float(), k_rot]) if start_pos else k_rot
    V = torch.cat([v_old.float(), v]) if start_pos else v
    ref = causal_attention(q_rot, K, V)
    low = lowp_causal_attention(q_rot.to(dtype), K.to(dtype), V.to(dtype))
    assert not torch.isnan(out).any()
    err, err_torch = rel(out, ref), rel(low, ref)
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    return err, err_torch


@pytest.mark.parametrize("T,start_pos", [(1, 0), (7, 0), (37, 0), (1, 13), (7, 21), (29, 40)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prefill_small_blocks(device, dtype, T, start_pos):
    # 16x16 tiles: several q blocks, unmasked + diagonal loops, start_pos not tile-aligned
    run_case(device, dtype, T, start_pos, config=(16, 16, 4, 1))


@pytest.mark.parametrize("T,start_pos", [(5, 0), (70, 3)])
def test_prefill_default_config(device, T, start_pos):
    run_case(device, torch.float16, T, start_pos)


def test_prefill_gqa_group_6(device):
    # 12 q heads over 2 kv heads (Pixtral-Large's group of 12 is the same code path)
    run_case(device, torch.float16, 9, 4, hq=12, hkv=2, config=(16, 16, 4, 1))


def test_prefill_bad_inputs(device):
    D = 128
    cs = rope_table(32, D, THETA, device)
    kc = torch.zeros(1, 2, 32, D, device=device)
    qkv = torch.zeros(4, 8 * D, device=device)
    with pytest.raises(ValueError, match="max_seq"):
        prefill_attention(qkv, kc, kc.clone(), 0, 30, cs, 4, 2)
    with pytest.raises(ValueError, match="qkv"):
        prefill_attention(qkv[:, :-1], kc, kc.clone(), 0, 0, cs, 4, 2)
    with pytest.raises(ValueError, match="slot"):
        prefill_attention(qkv, kc, kc.clone(), 3, 0, cs, 4, 2)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T,start_pos", [(1, 0), (7, 0), (97, 0), (1025, 0), (4097, 0), (1, 4096), (97, 1025),
                                         (1025, 3001)])
def test_prefill_bf16(T, start_pos):
    run_case("cuda", torch.bfloat16, T, start_pos, hq=32, hkv=8, slots=2)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("config", [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)])
def test_prefill_bf16_configs(config):
    run_case("cuda", torch.bfloat16, 777, 130, hq=32, hkv=8, slots=2, config=config)


def check_rope_store(device, dtype, T, hq, hkv, block_t=None, hpp=None, pdl=False, D=128, slots=3, max_seq=50):
    """rope_store_kv alone: scattered positions and slots (the decode batch case), several token blocks
    and head groups; poisoned cache, every untouched entry must stay NaN."""
    from pixtral_rt.kernels.prefill_attention import rope_store_kv
    torch.manual_seed(T * 13 + hq + (block_t or 0))
    cs = rope_table(max_seq, D, THETA, device)
    flat = torch.randperm(slots * max_seq)[:T]
    pos, slot = (flat % max_seq).to(device=device, dtype=torch.int32), (flat // max_seq).to(device=device,
                                                                                          dtype=torch.int32)
    kc = torch.full((slots, hkv, max_seq, D), float("nan"), device=device, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=device, dtype=dtype)
    q, k, v = qkv.float().split([hq * D, hkv * D, hkv * D], -1)
    ang = text_rope_angles(pos.long(), D, THETA)
    q_rot, k_rot = apply_rope(q.view(T, hq, D), ang), apply_rope(k.view(T, hkv, D), ang)
    rope_store_kv(qkv, pos, slot, kc, vc, cs, hq, hkv, pdl=pdl, block_t=block_t, heads_per_program=hpp)
    tol = lambda r: 2 * rel(r.to(dtype), r) + 1e-6  # noqa: E731 - one rounding of the exact rotation
    assert rel(qkv[:, :hq * D].view(T, hq, D), q_rot) <= tol(q_rot)
    assert rel(kc[slot.long(), :, pos.long()], k_rot) <= tol(k_rot)
    assert torch.equal(vc[slot.long(), :, pos.long()], v.view(T, hkv, D).to(dtype))
    assert torch.equal(qkv[:, hq * D:].float(), torch.cat([k, v], -1))   # k, v untouched in qkv
    written = torch.zeros(slots, max_seq, dtype=torch.bool, device=device)
    written[slot.long(), pos.long()] = True
    assert torch.isnan(kc.transpose(1, 2)[~written]).all() and torch.isnan(vc.transpose(1, 2)[~written]).all()


@pytest.mark.parametrize("T,hq,hkv,block_t,hpp", [(1, 4, 2, None, None), (3, 4, 2, 2, 1), (19, 8, 2, 8, 2),
                                                  (70, 4, 2, None, None), (37, 12, 4, 16, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rope_store_kv(device, dtype, T, hq, hkv, block_t, hpp):
    check_rope_store(device, dtype, T, hq, hkv, block_t, hpp)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T,pdl", [(1, False), (1, True), (2, True), (97, False), (4097, False)])
def test_rope_store_kv_bf16(T, pdl):
    check_rope_store("cuda", torch.bfloat16, T, 32, 8, pdl=pdl, max_seq=4200 if T > 100 else 300)
