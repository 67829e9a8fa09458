"""Small shared test utilities: prompts with the Pixtral image-token layout, random images."""
from __future__ import annotations

import torch

from pixtral_rt.config import PixtralArgs


def image_tokens(args: PixtralArgs, rows: int, cols: int) -> list[int]:
    """[IMG]*cols + [IMG_BREAK] per row (rows, cols after merging); the last token becomes [IMG_END]."""
    v = args.vision
    toks = []
    for _ in range(rows):
        toks += [v.image_token_id] * cols + [v.image_break_token_id]
    toks[-1] = v.image_end_token_id
    return toks


def random_images(args: PixtralArgs, grids: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """Random normalised (3, H, W) images whose patch grids are `grids` (rows, cols in merged units)."""
    g = torch.Generator().manual_seed(seed)
    unit = args.vision.patch_size * args.vision.spatial_merge_size
    return [torch.randn(3, r * unit, c * unit, generator=g) for r, c in grids]


def prompt_with_images(args: PixtralArgs, grids: list[tuple[int, int]], text_ids: list[int]) -> list[int]:
    """<s>[INST] <images> text [/INST]"""
    toks = [1, 3]
    for r, c in grids:
        toks += image_tokens(args, r, c)
    return toks + text_ids + [4]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
