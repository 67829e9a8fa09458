"""The reference model against HF transformers (an independent implementation), through both checkpoint
formats, plus the KV cache and block-diagonal properties. CPU, fp32, tiny configs of the real architecture."""
from __future__ import annotations

import pytest
import torch

from pixtral_rt.checkpoint import load_reference_model
from pixtral_rt.config import tiny
from pixtral_rt.random_weights import write_random_checkpoint
from tests.helpers import prompt_with_images, random_images, rel_err

transformers = pytest.importorskip("transformers", reason="transformers is the independent reference (test extra)")

GRID_SETS = {
    "text-only": [],
    "one-image-2x3": [(2, 3)],
    "three-images-1x1-1x5-3x2": [(1, 1), (1, 5), (3, 2)],
}


@pytest.fixture(scope="module", params=[False, True], ids=["pixtral-llava", "mistral3-merger"])
def checkpoints(request, tmp_path_factory):
    """The same seeded random weights written in HF and in Mistral format, and the HF model on the HF copy."""
    merge = request.param
    args = tiny(merge, vocab_size=2048)
    hf_dir = write_random_checkpoint(tmp_path_factory.mktemp("hf"), args, "hf", seed=3, dtype=torch.float32)
    mi_dir = write_random_checkpoint(tmp_path_factory.mktemp("mistral"), args, "mistral", seed=3, dtype=torch.float32)
    cls = (transformers.Mistral3ForConditionalGeneration if merge else transformers.LlavaForConditionalGeneration)
    hf = cls.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    from_hf, plan_hf = load_reference_model(hf_dir)
    from_mi, plan_mi = load_reference_model(mi_dir)
    assert plan_hf.format == "hf" and plan_mi.format == "mistral"
    return args, hf, from_hf, from_mi


def _hf_inputs(images):
    H = max(i.shape[1] for i in images)
    W = max(i.shape[2] for i in images)
    px = torch.full((len(images), 3, H, W), 7.0)  # padding must be ignored by HF: make it loud
    for i, im in enumerate(images):
        px[i, :, :im.shape[1], :im.shape[2]] = im
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images])
    return px, sizes


@pytest.mark.parametrize("grids", list(GRID_SETS.values()), ids=list(GRID_SETS))
def test_logits_match_hf_both_formats(checkpoints, grids):
    args, hf, from_hf, from_mi = checkpoints
    images = random_images(args, grids, seed=len(grids))
    toks = prompt_with_images(args, grids, [1100, 1234, 1999, 1500])
    kw = {}
    if images:
        kw["pixel_values"], kw["image_sizes"] = _hf_inputs(images)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([toks]), **kw).logits[0]
        for model in (from_hf, from_mi):
            out = model.forward_tokens(torch.tensor(toks), images or None)
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= 1e-4


def test_vision_features_match_hf(checkpoints):
    args, hf, from_hf, from_mi = checkpoints
    grids = GRID_SETS["three-images-1x1-1x5-3x2"]
    images = random_images(args, grids, seed=11)
    px, sizes = _hf_inputs(images)
    with torch.no_grad():
        ref = torch.cat(list(hf.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output))
        for model in (from_hf, from_mi):
            feats = model.image_features(images)
            assert feats.shape == ref.shape == (sum(r * c for r, c in grids), args.text.dim)
            assert rel_err(feats, ref) <= 1e-4


def test_incremental_decoding_equals_one_shot(checkpoints):
    from pixtral_rt.reference.transformer import KVCache
    args, _, model, _ = checkpoints
    grids = [(2, 2), (1, 3)]
    images = random_images(args, grids, seed=5)
    toks = torch.tensor(prompt_with_images(args, grids, [1300, 1301]) + [1400, 1401, 1402, 1403, 1404])
    with torch.no_grad():
        full = model.forward_tokens(toks, images)
        cache = KVCache.empty(args.text, len(toks))
        split = len(toks) - 5
        parts = [model.forward_tokens(toks[:split], images, 0, cache)]
        parts.append(model.forward_tokens(toks[split:split + 2], None, split, cache))  # a 2-token chunk
        for t in range(split + 2, len(toks)):
            parts.append(model.forward_tokens(toks[t:t + 1], None, t, cache))
    assert rel_err(torch.cat(parts), full) <= 1e-5


def test_block_diagonal_images_do_not_see_each_other(checkpoints):
    args, _, model, _ = checkpoints
    grids = [(2, 3), (1, 1), (3, 2)]
    images = random_images(args, grids, seed=7)
    changed = [im.clone() for im in images]
    changed[1] = torch.randn_like(changed[1])
    with torch.no_grad():
        a = model.vision_encoder(images)
        b = model.vision_encoder(changed)
    p = args.vision.spatial_merge_size ** 2
    n0, n1 = grids[0][0] * grids[0][1] * p, grids[1][0] * grids[1][1] * p
    assert torch.equal(a[:n0], b[:n0]) and torch.equal(a[n0 + n1:], b[n0 + n1:])
    assert not torch.allclose(a[n0:n0 + n1], b[n0:n0 + n1])  # the changed image itself did change


def test_greedy_generate_matches_argmax_of_full_forward(checkpoints):
    args, _, model, _ = checkpoints
    grids = [(1, 2)]
    images = random_images(args, grids, seed=2)
    toks = prompt_with_images(args, grids, [1200])
    new = model.generate(toks, images, max_new_tokens=6, eos_id=None)
    assert len(new) == 6
    with torch.no_grad():
        logits = model.forward_tokens(torch.tensor(toks + new[:-1]), images)
    assert new == logits[len(toks) - 1:].argmax(-1).tolist()
