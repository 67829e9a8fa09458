"""pixtral_rt/vision.py (FastVisionEncoder) vs the reference model (pixtral_rt.reference).

CPU: tiny configs in fp32 (Triton interpreter), Pixtral and Mistral3 (norm + patch merger), both RoPE modes,
bucket padding. GPU: full-size Pixtral-12B vision weights N(0, 0.02) in bf16 vs the fp32 reference, with a
tolerance of 2x the reference-in-bf16's own error; padding invariance; CUDA graph replay vs eager.
"""
import dataclasses

import pytest
import torch

from pixtral_rt.config import PIXTRAL_12B, PixtralArgs, tiny
from pixtral_rt.reference.model import PixtralModel
from pixtral_rt.reference.vision_encoder import VisionEncoder
from pixtral_rt.vision import FastVisionEncoder, pack_patches
from tests.conftest import requires_gpu
from tests.helpers import random_images, rel_err


def random_reference(args: PixtralArgs, seed: int, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    ref = PixtralModel(args)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.02)
            else:
                p.normal_(mean=1.0, std=0.1)
    return ref.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("merge", [False, True], ids=["pixtral", "mistral3"])
@pytest.mark.parametrize("rope", ["fused", "separate"])
def test_fast_encoder_matches_reference_cpu(merge, rope):
    args = tiny(merge=merge, vocab_size=1000)
    ref = random_reference(args, seed=1 + merge)
    m = args.vision.spatial_merge_size
    grids = [(2, 3), (1, 1), (3, 2)]  # merged units
    imgs = random_images(args, grids, seed=5)
    with torch.no_grad():
        want = ref.image_features(imgs)
        enc = FastVisionEncoder.from_reference(ref, dtype=torch.float32, rope=rope, block_m=16)
        plan = enc.plan([(r * m, c * m) for r, c in grids])
        got = enc(pack_patches(imgs, args.vision.patch_size), plan)
    assert got.shape == want.shape
    # fp32 everywhere: only summation order differs (seen ~1e-7); 1e-5 leaves room, a wrong index is ~1
    assert rel_err(got, want) < 1e-5


def test_fast_encoder_bucket_padding_cpu():
    """Padding rows (random garbage or NaN, own segment, never attended) leave the real rows bit-identical."""
    args = tiny(vocab_size=1000)
    ref = random_reference(args, seed=3)
    grids = [(2, 5), (3, 3)]
    imgs = random_images(args, grids, seed=2)
    p = args.vision.patch_size
    with torch.no_grad():
        enc = FastVisionEncoder.from_reference(ref, dtype=torch.float32, block_m=16)
        x = pack_patches(imgs, p)
        plan = enc.plan(grids)
        base = enc(x, plan)
        for seed in (0, 1, 2):
            g = torch.Generator().manual_seed(seed)
            planb = enc.plan(grids, bucket=x.shape[0] + 11, max_images=4)
            pad = torch.full((11, x.shape[1]), float("nan")) if seed == 2 else 5 * torch.randn(11, x.shape[1], generator=g)
            out = enc(torch.cat([x, pad]), planb)
            assert torch.isfinite(out[:plan.n_merged]).all()
            torch.testing.assert_close(out[:plan.n_merged], base, rtol=0, atol=1e-6)
            # the padding segment is planned but gets no attention tiles (no work on padding rows)
            assert planb.cu_seqlens[len(grids) + 1] - planb.cu_seqlens[len(grids)] == 11
            assert (planb.attn.tiles[0] == len(grids)).sum() == 0
            assert planb.attn.max_tiles % 16 == 0


def test_from_state_dict_checks_keys():
    args = tiny(vocab_size=1000)
    with pytest.raises(KeyError, match="patch_conv"):
        FastVisionEncoder.from_state_dict({}, args)


# ----------------------------------------------------------------------------------------------- GPU
def _full_vision_ref(seed):
    v = PIXTRAL_12B.vision
    torch.manual_seed(seed)
    ref = VisionEncoder(v)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.02)
            else:
                p.normal_(mean=1.0, std=0.1)
    return ref.cuda().float().eval()


GPU_CFG = {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}  # fixed: no autotune compile time in tests


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rope", ["fused", "separate"])
def test_fast_encoder_full_size_bf16_gpu(rope):
    cfg = GPU_CFG
    ref = _full_vision_ref(0)
    grids = [(32, 48), (1, 64), (64, 1), (3, 5), (1, 1)]
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randn(3, r * 16, c * 16, generator=g).cuda() for r, c in grids]
    with torch.no_grad():
        want = ref(imgs).float()
        ref_bf16 = VisionEncoder(ref.args).cuda()
        ref_bf16.load_state_dict(ref.state_dict())
        base = rel_err(ref_bf16.to(torch.bfloat16)(imgs), want)
        enc = FastVisionEncoder.from_reference(ref, dtype=torch.bfloat16, rope=rope, attn_config=cfg, block_m=128)
        got = enc.encode(pack_patches(imgs, 16, torch.bfloat16), enc.plan(grids))
    err = rel_err(got, want)
    assert torch.isfinite(got).all()
    assert err <= 2 * base + 1e-3, f"fast bf16 err {err:.3e} vs reference-bf16 err {base:.3e}"


@requires_gpu
@pytest.mark.gpu
def test_fast_encoder_graph_and_padding_gpu():
    args = dataclasses.replace(PIXTRAL_12B, vision=dataclasses.replace(PIXTRAL_12B.vision, num_hidden_layers=4))
    ref = random_reference(dataclasses.replace(args, text=dataclasses.replace(args.text, n_layers=1, vocab_size=256,
                                                                               dim=512, hidden_dim=512)),
                           seed=4, device="cuda", dtype=torch.float32)
    enc = FastVisionEncoder.from_reference(ref, dtype=torch.bfloat16, attn_config=GPU_CFG, block_m=128)
    grids = [(20, 30), (7, 9)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(r * c for r, c in grids), 768, generator=g).cuda().bfloat16()
    bucket, max_images = 1024, 4
    graph = enc.capture(bucket, max_images)
    with torch.no_grad():
        plan = enc.plan(grids, bucket=bucket, max_images=max_images)
        eager_pad = enc(torch.cat([x, torch.randn(bucket - x.shape[0], 768, device="cuda").bfloat16()]), plan)
        eager_pad2 = enc(torch.cat([x, 100 * torch.randn(bucket - x.shape[0], 768, device="cuda").bfloat16()]),
                         plan)
        replay = graph(x, plan).clone()
        unpadded = enc(x, enc.plan(grids))
    n = x.shape[0]
    assert torch.equal(eager_pad[:n], eager_pad2[:n]), "padding content changed real outputs"
    assert torch.equal(replay, eager_pad[:n]), "graph replay differs from eager"
    # unpadded run uses other GEMM shapes (other cuBLAS kernels): equal up to bf16 rounding
    assert rel_err(unpadded, eager_pad[:n]) < 2e-2
    # a second pack of other sizes through the same graph
    grids2 = [(31, 32)]
    x2 = torch.randn(31 * 32, 768, device="cuda").bfloat16()
    with torch.no_grad():
        plan2 = enc.plan(grids2, bucket=bucket, max_images=max_images)
        got2 = graph(x2, plan2).clone()
        want2 = enc(torch.cat([x2, torch.zeros(bucket - x2.shape[0], 768, device="cuda").bfloat16()]), plan2)
    assert torch.equal(got2, want2[:x2.shape[0]])
