"""kernels/token_bitmask.py (structured output's token mask, applied in place inside the decode step)
against a plain masked fill: awkward vocab sizes (a partial last word), constrained and free rows mixed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixtral_rt.kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch_
from tests.test_constrained_decoding import _pack


@pytest.mark.parametrize("B,V", [(1, 32), (5, 1001), (3, 4096 + 77), (7, 33)])
def test_token_bitmask_kernel_matches_masked_fill(device, B, V):
    g = np.random.default_rng(B * V)
    logits = torch.from_numpy(g.standard_normal((B, V)).astype(np.float32)) * 4
    allowed = g.random((B, V)) < 0.3
    allowed[:, V - 1] = True                                   # the last (partial) word is exercised
    allowed[0, 0] = False
    masked = np.zeros(B, dtype=np.int32)
    masked[::2] = 1                                            # rows 0, 2, ...: constrained; others free
    want = logits.clone()
    want[torch.from_numpy(~allowed & (masked[:, None] != 0))] = float("-inf")
    bm = torch.from_numpy(_pack(allowed))
    for fn in (apply_token_bitmask_torch_, apply_token_bitmask_):
        got = logits.clone().to(device)
        fn(got, bm.to(device), torch.from_numpy(masked).to(device))
        assert torch.equal(got.cpu(), want), fn.__name__


def test_token_bitmask_kernel_refuses_a_mask_of_another_vocab(device):
    logits = torch.randn(2, 100, device=device)
    with pytest.raises(ValueError, match=r"\(2, 4\) int32"):
        apply_token_bitmask_(logits, torch.zeros(2, 3, dtype=torch.int32, device=device),
                             torch.ones(2, dtype=torch.int32, device=device))
