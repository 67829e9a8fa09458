"""kernels/vision_attention.py and kernels/rope_2d.py vs the fp32 reference
(reference.attention.block_diagonal_attention + reference.rope).

Tolerance: the kernel's error vs the fp32 reference must be <= 2x the error of PyTorch SDPA run in the same
dtype (RoPE in fp32, cast, SDPA per image) + a small eps. Outputs are poisoned with NaN before each run.
CPU (interpreter): fp16, small grids. GPU: bf16, grids 1x1, 1x64, 64x1, 3x5, 64x64, packs of 1 to 8 images.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import HAS_CUDA, requires_gpu
from pixtral_rt.kernels.rope_2d import rope_2d_, rope_2d_qk_
from pixtral_rt.kernels.vision_attention import (max_tiles_for, plan_vision_attention, rope_pair_freqs,
                                                 vision_attention)
from pixtral_rt.reference.attention import block_diagonal_attention
from pixtral_rt.reference.rope import apply_rope, image_patch_positions, vision_rope_angles

THETA = 10000.0
# GPU tests run one fixed config (the autotuner's compile time is spent once, in test_autotuned_gpu)
GPU_CFG = {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def half_perm(d):
    """Column permutation interleaved -> rotate-half layout (evens, then odds)."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def make_case(grids, heads, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    lens = [r * c for r, c in grids]
    n = sum(lens)
    q, k, v = (torch.randn(n, heads, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    pos = image_patch_positions(grids).to(device=device, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return lens, q, k, v, pos, cu


def reference(q, k, v, pos, cu, d):
    ang = vision_rope_angles(pos.long(), d, THETA)
    return block_diagonal_attention(apply_rope(q.float(), ang), apply_rope(k.float(), ang), v.float(),
                                    cu.tolist()).float()


def sdpa_same_dtype(q, k, v, pos, cu, d):
    ang = vision_rope_angles(pos.long(), d, THETA)
    qr, kr = apply_rope(q, ang), apply_rope(k, ang)  # fp32 math, cast back to q's dtype
    b = cu.tolist()
    outs = []
    for a, e in zip(b[:-1], b[1:]):
        outs.append(F.scaled_dot_product_attention(qr[a:e].transpose(0, 1), kr[a:e].transpose(0, 1),
                                                   v[a:e].transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs).float()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_kernel(q, k, v, pos, cu, lens, d, mode, block_m, config=None):
    plan = plan_vision_attention(lens, block_m, device=q.device)
    freqs = rope_pair_freqs(d, THETA, q.device)
    out = torch.full_like(q, float("nan"))
    if config is None and q.is_cuda:
        config = GPU_CFG
    if mode == "fused":
        return vision_attention(q, k, v, cu, plan, pos, freqs, out=out, config=config)
    if mode == "fused_half":
        p = half_perm(d).to(q.device)
        return vision_attention(q[:, :, p].contiguous(), k[:, :, p].contiguous(), v, cu, plan, pos, freqs,
                                layout="half", out=out, config=config)
    if mode == "separate":  # as the encoder: q and k rotated in place in a fused (N, 3, H, D) buffer
        qkv = torch.stack([q, k, v], 1)
        rope_2d_qk_(qkv, pos, freqs, q.shape[1])
        assert torch.equal(qkv[:, 2], v)
        return vision_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, plan, rope=False, out=out, config=config)
    raise AssertionError(mode)


def check(grids, heads, d, dtype, device, seed, mode, block_m, config=None):
    lens, q, k, v, pos, cu = make_case(grids, heads, d, dtype, device, seed)
    ref = reference(q, k, v, pos, cu, d)
    base = rel(sdpa_same_dtype(q, k, v, pos, cu, d), ref)
    out = run_kernel(q, k, v, pos, cu, lens, d, mode, block_m, config)
    assert not torch.isnan(out).any(), "some outputs were not written"
    err = rel(out, ref)
    assert err <= 2 * base + 1e-4, f"{grids} d={d} {mode}: kernel err {err:.2e} vs SDPA-{dtype} err {base:.2e}"


CPU_PACKS = [[(1, 1)], [(3, 5)], [(1, 9), (9, 1), (3, 5)], [(1, 1), (2, 3), (4, 4), (1, 7), (5, 2), (1, 1),
                                                                  (3, 3), (2, 2)]]


@pytest.mark.parametrize("grids", CPU_PACKS, ids=lambda g: f"{len(g)}img")
@pytest.mark.parametrize("d", [64, 88])
@pytest.mark.parametrize("mode", ["fused", "fused_half", "separate"])
def test_vision_attention_small(grids, d, mode, device):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    check(grids, 2, d, dtype, device, seed=hash((str(grids), d, mode)) % 1000, mode=mode,
          block_m=16 if device == "cpu" else 128)


def test_autotune_config_pruning():
    """64-row tiles take the 4-warp configs, 128-row tiles the 8-warp ones; TMA configs only where the
    launcher passes descriptors (tma_ok); never an empty list."""
    from pixtral_rt.kernels import vision_attention as va
    cfgs = va._configs()
    for bm in (64, 128):
        for tma in (0, 1):
            kept = va._prune(cfgs, {"BLOCK_M": bm, "DP": 64, "tma_ok": tma})
            assert kept
            if va._INTERPRET:
                continue
            assert all((c.num_warps == 4) == (bm == 64) for c in kept)
            assert tma or not any(c.kwargs["KV_DESC"] for c in kept)
            if bm == 64 and tma:
                assert any(c.kwargs["KV_DESC"] for c in kept)


def test_tma_not_used_off_gpu_or_with_rope(device):
    """No TMA on the CPU, with in-kernel RoPE, or for a head_dim that is not a power of two; asking for it
    there is an error naming KV_DESC."""
    from pixtral_rt.kernels.vision_attention import tma_eligible
    d = 60                                                # multiple of 4, not a power of two
    q = torch.randn(8, 2, d, device=device, dtype=torch.float16)
    assert not tma_eligible(q, q, q, rope=True)
    assert not tma_eligible(q, q, q, rope=False)
    cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "KV_DESC": True}
    with pytest.raises(ValueError, match="KV_DESC"):
        vision_attention(q, q, q, torch.tensor([0, 8], dtype=torch.int32, device=device),
                         plan_vision_attention([8], 16, device=device), rope=False, config=cfg)


@requires_gpu
@pytest.mark.gpu
def test_vision_attention_gpu_tma_nan_padding():
    """TMA boxes read only full tiles: with the pack's padding rows of k and v set to NaN (what an unwritten
    bucket row may hold), the images' partial last tiles still read none of them."""
    lens, q, k, v, pos, cu = make_case([(5, 37), (64, 64), (3, 3)], 16, 64, torch.bfloat16, "cuda", seed=11)
    n, pad = sum(lens), 100
    freqs = rope_pair_freqs(64, THETA, "cuda")
    qkv = torch.stack([q, k, v], 1)
    rope_2d_qk_(qkv, pos, freqs, 16)
    want = vision_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, plan_vision_attention(lens, 64, device="cuda"),
                            rope=False, config={"BLOCK_N": 64, "num_warps": 4, "num_stages": 2})
    big = torch.cat([qkv, torch.full((pad, 3, 16, 64), float("nan"), device="cuda", dtype=qkv.dtype)])
    plan = plan_vision_attention(lens, 64, max_tiles=max_tiles_for(n + pad, 4, 64), device="cuda")
    for bn in (64, 128):
        out = torch.full((n + pad, 16, 64), float("nan"), device="cuda", dtype=q.dtype)
        vision_attention(big[:, 0], big[:, 1], big[:, 2], cu, plan, rope=False, out=out,
                         config={"BLOCK_N": bn, "num_warps": 4, "num_stages": 2, "KV_DESC": True, "maxnreg": 168})
        assert not torch.isnan(out[:n]).any(), bn
        assert rel(out[:n], want) < 1e-2, (bn, rel(out[:n], want))


@requires_gpu
@pytest.mark.gpu
def test_vision_attention_gpu_tma():
    """KV_DESC: full K / V tiles through TMA descriptors over the strided views of a fused qkv buffer; the
    partial tail tile must not read the next image (or NaN padding) through the box."""
    for bm, bn, w in ((64, 128, 4), (64, 64, 4), (128, 64, 8)):
        cfg = {"BLOCK_N": bn, "num_warps": w, "num_stages": 3, "KV_DESC": True}
        check(GPU_GRIDS + [(37, 41)], 16, 64, torch.bfloat16, "cuda", seed=bn + w, mode="separate", block_m=bm,
              config=cfg)


def test_rope_2d_matches_reference(device):
    for d in (64, 88):
        grids = [(3, 5), (2, 2)]
        lens, q, _, _, pos, _ = make_case(grids, 3, d, torch.float32, device, seed=d)
        ang = vision_rope_angles(pos.long(), d, THETA)
        out = rope_2d_(q.clone(), pos, rope_pair_freqs(d, THETA, device))
        assert rel(out, apply_rope(q, ang)) < 1e-5
        p = half_perm(d).to(device)
        out_h = rope_2d_(q[:, :, p].contiguous(), pos, rope_pair_freqs(d, THETA, device), layout="half")
        assert rel(out_h, apply_rope(q, ang)[:, :, p]) < 1e-5


@pytest.mark.parametrize("heads,d", [(3, 64), (16, 64), (5, 88), (2, 16)])
def test_rope_2d_qk_fused_buffer(heads, d, device):
    """q and k of a fused (N, 3, H, D) buffer turn in one launch; v and every other byte stay as they were.
    Token counts that are not multiples of the token block, head counts that are not powers of two."""
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for i, dtype in enumerate(dtypes):
        grids = [(3, 5), (1, 7), (2, 2)] if device == "cpu" else [(37, 41), (1, 3), (64, 64)]
        g = torch.Generator().manual_seed(100 * heads + d + i)
        pos = image_patch_positions(grids).to(device=device, dtype=torch.int32)
        n = pos.shape[0]
        buf = torch.randn(n, 3 * heads * d + 8, generator=g).to(device=device, dtype=dtype)  # padded rows
        qkv = buf[:, :3 * heads * d].view(n, 3, heads, d)
        before = buf.clone()
        rope_2d_qk_(qkv, pos, rope_pair_freqs(d, THETA, device), heads)
        ang = vision_rope_angles(pos.long(), d, THETA)
        for j in (0, 1):
            want = apply_rope(before[:, :3 * heads * d].view(n, 3, heads, d)[:, j].float(), ang)
            got = qkv[:, j].float()
            tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert rel(got, want) < tol, (dtype, j, rel(got, want))
        assert torch.equal(buf[:, 2 * heads * d:], before[:, 2 * heads * d:]), "v / row padding changed"


def test_padded_plan_and_padding_segment(device):
    """A bucket-padded plan (idle tiles) and a padding segment leave the real rows exactly as without them."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    bm = 16 if device == "cpu" else 128
    grids = [(3, 5), (1, 6)]
    lens, q, k, v, pos, cu = make_case(grids, 2, 64, dtype, device, seed=7)
    n = sum(lens)
    freqs = rope_pair_freqs(64, THETA, device)
    out = vision_attention(q, k, v, cu, plan_vision_attention(lens, bm, device=device), pos, freqs)
    pad = 13
    qp, kp, vp = (torch.cat([t, torch.randn(pad, 2, 64, device=device).to(dtype)]) for t in (q, k, v))
    posp = torch.cat([pos, torch.zeros(pad, 2, dtype=torch.int32, device=device)])
    cup = torch.tensor(cu.tolist() + [n + pad, n + pad, n + pad], dtype=torch.int32, device=device)
    plan = plan_vision_attention(lens + [pad, 0, 0], bm, max_tiles=max_tiles_for(n + pad, 5, bm), device=device)
    outp = torch.full_like(qp, float("nan"))
    vision_attention(qp, kp, vp, cup, plan, posp, freqs, out=outp)
    assert not torch.isnan(outp).any()
    assert torch.equal(outp[:n], out)


def test_bad_inputs_raise(device):
    q = torch.randn(10, 2, 64, device=device, dtype=torch.float16)
    cu = torch.tensor([0, 10], dtype=torch.int32, device=device)
    plan = plan_vision_attention([10], 16, device=device)
    with pytest.raises(ValueError, match="k"):
        vision_attention(q, q[:5], q, cu, plan, rope=False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        vision_attention(q, q, q, cu.long(), plan, rope=False)
    with pytest.raises(ValueError, match="positions"):
        vision_attention(q, q, q, cu, plan)
    with pytest.raises(ValueError, match="max_tiles"):
        plan_vision_attention([100], 16, max_tiles=2)
    with pytest.raises(ValueError, match="positions"):
        rope_2d_(q, cu.view(1, 2).repeat(10, 1)[:9], rope_pair_freqs(64, THETA, device))
    with pytest.raises(ValueError, match="qkv"):
        rope_2d_qk_(torch.randn(10, 100, device=device), cu.view(1, 2).repeat(10, 1),
                    rope_pair_freqs(64, THETA, device), 16)


GPU_GRIDS = [(1, 1), (1, 64), (64, 1), (3, 5), (64, 64)]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n_images", [1, 8])
@pytest.mark.parametrize("d,heads", [(64, 16), (88, 16)])
@pytest.mark.parametrize("mode", ["fused", "fused_half", "separate"])
def test_vision_attention_gpu_bf16(n_images, d, heads, mode):
    rng = random.Random(n_images * 1000 + d)
    grids = [rng.choice(GPU_GRIDS) for _ in range(n_images)]
    if n_images == 1:
        grids = [(64, 64)]
    check(grids, heads, d, torch.bfloat16, "cuda", seed=n_images + d, mode=mode, block_m=128)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_n,warps,stages", [(128, 8, 3), (64, 8, 4)])
def test_vision_attention_gpu_autotune_configs(block_n, warps, stages):
    """The autotuner's tile shapes, bf16 and fp16, every grid shape in one pack, q/k/v strided views."""
    cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
    check(GPU_GRIDS, 16, 64, torch.bfloat16, "cuda", seed=block_n, mode="separate", block_m=128, config=cfg)
    check(GPU_GRIDS + [(32, 32)], 16, 64, torch.float16, "cuda", seed=block_n + 9, mode="separate",
          block_m=128, config=cfg)


@requires_gpu
@pytest.mark.gpu
def test_vision_attention_gpu_block_m64():
    check(GPU_GRIDS, 16, 64, torch.bfloat16, "cuda", seed=64, mode="fused_half", block_m=64,
          config={"BLOCK_N": 64, "num_warps": 4, "num_stages": 2})


@requires_gpu
@pytest.mark.gpu
def test_vision_attention_autotuned_cuda_graph():
    """The autotuned path the encoder uses (rope=False after rope_2d_qk_), then a CUDA graph replay."""
    from pixtral_rt.kernels.vision_attention import default_block_m, warmup_vision_attention
    grids = [(64, 64), (3, 5)]
    lens, q, k, v, pos, cu = make_case(grids, 16, 64, torch.bfloat16, "cuda", seed=3)
    warmup_vision_attention(16, 64, [q.shape[0]], rope=False, layout="interleaved")
    plan = plan_vision_attention(lens, default_block_m("cuda", 64), device="cuda")   # 64 rows + TMA on Hopper
    freqs = rope_pair_freqs(64, THETA, "cuda")
    qr, kr = rope_2d_(q.clone(), pos, freqs), rope_2d_(k.clone(), pos, freqs)
    out = torch.full_like(q, float("nan"))
    vision_attention(qr, kr, v, cu, plan, rope=False, out=out)
    ref = reference(q, k, v, pos, cu, 64)
    base = rel(sdpa_same_dtype(q, k, v, pos, cu, 64), ref)
    assert rel(out, ref) <= 2 * base + 1e-4
    eager = out.clone()
    out.fill_(float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        vision_attention(qr, kr, v, cu, plan, rope=False, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert not HAS_CUDA or torch.isfinite(out).all()
