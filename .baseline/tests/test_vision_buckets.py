"""pixtral_rt/vision_buckets.py: the encoder's row counts (issue 12). Every pack of N >= MIN_BUCKET patches up
to one full-size image runs on a graph bucket with at most 12% padding rows; above, the eager path pads to a
multiple of 16 only. FastVisionEncoder.run takes that path and gives the reference's features (CPU, Triton
interpreter, fp32)."""
import pytest
import torch

from pixtral_rt.config import PIXTRAL_12B, preset, tiny
from pixtral_rt.vision import FastVisionEncoder, pack_patches
from pixtral_rt.vision_buckets import (MAX_PADDING, MIN_BUCKET, ROW_ALIGN, bucket_for, eager_rows,
                                       full_image_patches, graph_buckets)
from tests.conftest import requires_gpu
from tests.helpers import random_images, rel_err
from tests.test_vision_fast import random_reference


@pytest.mark.parametrize("name", ["Pixtral-12B-2409", "Pixtral-Large-Instruct-2411", "Mistral-Small-3.1-24B-2503"])
def test_padding_bound_for_every_patch_count(name):
    v = preset(name).vision
    b = graph_buckets(v)
    full = full_image_patches(v)
    assert b == sorted(set(b)) and b[0] == MIN_BUCKET and b[-1] == -(-full // ROW_ALIGN) * ROW_ALIGN
    assert all(x % ROW_ALIGN == 0 for x in b)
    worst = 0.0
    for n in range(1, b[-1] + 1):
        got = bucket_for(n, b)
        assert got is not None and got >= n
        if n >= MIN_BUCKET:
            worst = max(worst, got / n)
    assert worst <= 1 + MAX_PADDING, worst
    for n in (b[-1] + 1, 3 * full + 7, 12 * full):
        assert bucket_for(n, b) is None
        assert n <= eager_rows(n) < n + ROW_ALIGN and eager_rows(n) % ROW_ALIGN == 0


def test_pixtral_12b_buckets_reach_one_image_each_within_12_percent_of_the_next():
    # the property behind the padding bound: each bucket holds the next count above its neighbour with at
    # most MAX_PADDING padding rows, and the last bucket is one full-size image (64 x 64 patches)
    b = graph_buckets(PIXTRAL_12B.vision)
    assert b[-1] == full_image_patches(PIXTRAL_12B.vision) == 4096
    for lo, hi in zip(b, b[1:]):
        assert lo < hi <= (lo + 1) * (1 + MAX_PADDING), (lo, hi)
    assert bucket_for(2394, b) <= (1 + MAX_PADDING) * 2394          # the 1000x600 image of performance.md


def test_bad_counts_refused():
    with pytest.raises(ValueError, match="at least one patch"):
        bucket_for(0, graph_buckets(PIXTRAL_12B.vision))


@pytest.mark.parametrize("merge", [False, True], ids=["pixtral", "mistral3"])
def test_run_eager_path_matches_reference_cpu(merge):
    """Above the graph range (here: no graphs on CPU) run() pads to ROW_ALIGN rows and plans the fixed-shape
    plan the GPU uses; the real rows equal the reference's features."""
    args = tiny(merge=merge, vocab_size=1000)
    ref = random_reference(args, seed=7 + merge)
    m = args.vision.spatial_merge_size
    grids = [(3, 1), (1, 1), (2, 3)]                 # merged units: 3 + 1 + 6 = 10 units, pads to 16 rows+
    imgs = random_images(args, grids, seed=3)
    pg = [(r * m, c * m) for r, c in grids]
    with torch.no_grad():
        want = ref.image_features(imgs)
        enc = FastVisionEncoder.from_reference(ref, dtype=torch.float32, block_m=16)
        x = pack_patches(imgs, args.vision.patch_size)
        assert x.shape[0] % ROW_ALIGN != 0            # the eager path really pads
        got = enc.run(x, pg, max_images=4, use_graphs=True)
        plain = enc.run(x, pg, max_images=4, use_graphs=False)
    assert got.shape == want.shape == plain.shape
    assert rel_err(got, want) < 1e-5 and rel_err(plain, want) < 1e-5


@requires_gpu
@pytest.mark.gpu
def test_prepared_encoder_graphs_and_eager_path_gpu():
    """After prepare() (every bucket captured, one pool, one output buffer) run() takes a graph bucket or the
    eager path: the features equal the unpadded eager encoder's up to bf16 GEMM-shape rounding, a poisoned
    output buffer never shows, and two packs in a row do not disturb each other."""
    import dataclasses

    from tests.test_vision_fast import GPU_CFG
    args = dataclasses.replace(PIXTRAL_12B, vision=dataclasses.replace(PIXTRAL_12B.vision, num_hidden_layers=3))
    ref = random_reference(dataclasses.replace(args, text=dataclasses.replace(args.text, n_layers=1, vocab_size=256)),
                           seed=4, device="cuda", dtype=torch.float32)
    enc = FastVisionEncoder.from_reference(ref, dtype=torch.bfloat16, attn_config=GPU_CFG, block_m=128)
    enc.prepare(max_context=3 * 4096, max_images=4)
    assert enc.buckets == graph_buckets(args.vision) and len(enc._graphs) == len(enc.buckets)
    g = torch.Generator(device="cuda").manual_seed(0)
    prev = None
    for grids in ([(1, 1)], [(17, 23)], [(38, 63)], [(64, 64)], [(2, 64), (30, 40)], [(64, 64), (40, 60)],
                  [(64, 64)] * 2 + [(16, 16)]):
        n = sum(r * c for r, c in grids)
        x = torch.randn(n, 768, device="cuda", generator=g).bfloat16()
        enc.graph_output(1).fill_(float("nan"))
        with torch.inference_mode():
            got = enc.run(x, grids, max_images=4).clone()
            want = enc.run(x, grids, max_images=4, use_graphs=False)
        assert torch.isfinite(got).all(), grids
        assert rel_err(got, want) < 2e-2, (grids, rel_err(got, want))
        if prev is not None:        # the previous pack again: same result after another bucket ran
            with torch.inference_mode():
                again = enc.run(prev[0], prev[1], max_images=4)
            assert torch.equal(again, prev[2]), prev[1]
        prev = (x, grids, got)
