"""reference/upcast.py: a bf16 model run under fp32_compute gives the logits of its fp32 copy (the oracle the
GPU tests use without holding 50 GB of fp32 weights), and its weights come back bit-identical."""
import copy

import torch

from pixtral_rt.config import tiny
from pixtral_rt.random_weights import random_state_dict
from pixtral_rt.reference.model import PixtralModel
from pixtral_rt.reference.upcast import fp32_compute


def _inputs(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, 3 * args.vision.patch_size, 5 * args.vision.patch_size, generator=g) * 2 - 1
    n_img = 3 * 5
    text = torch.randint(1000, args.text.vocab_size, (7,), generator=g)
    tokens = torch.cat([text[:3], torch.full((n_img,), args.vision.image_token_id), text[3:]])
    return tokens, [img.bfloat16()]


def test_fp32_compute_matches_the_fp32_copy_and_restores_weights():
    args = tiny()
    m = PixtralModel(args).to(torch.bfloat16)
    m.load_state_dict(random_state_dict(args, seed=3, dtype=torch.bfloat16))
    m = m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fp32 = copy.deepcopy(m).float()
    tokens, images = _inputs(args)
    with torch.no_grad():
        want = fp32.forward_tokens(tokens, images)
        low = m.forward_tokens(tokens, images)
        with fp32_compute(m):
            got = m.forward_tokens(tokens, images)
    err = (got - want).abs().max().item()
    low_err = (low - want).abs().max().item()
    scale = want.abs().max().item()
    # the same fp32 computation up to op order: ~1e-6 of the logits' scale; bf16 compute is ~1e-2 off
    assert err <= 1e-5 * scale, (err, scale)
    assert low_err > 100 * max(err, 1e-7 * scale), "negative control: bf16 compute must be visibly worse"
    after = m.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_fp32_compute_restores_weights_when_the_forward_raises():
    args = tiny()
    m = PixtralModel(args).to(torch.bfloat16)
    m.load_state_dict(random_state_dict(args, seed=3, dtype=torch.bfloat16))
    tokens, _ = _inputs(args)
    with torch.no_grad(), fp32_compute(m):
        try:
            m.forward_tokens(tokens, None)         # [IMG] tokens without images: raises inside embed
        except ValueError:
            pass
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
