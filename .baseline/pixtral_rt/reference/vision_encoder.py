"""Reference Pixtral-ViT, plus the vision-language adapter and the Mistral3 patch merger.

Module names equal the Mistral checkpoint keys under `vision_encoder.`, `vision_language_adapter.`,
`patch_merger.` and `pre_mm_projector_norm.`.

Shapes: images is a list of (C, H_i, W_i) tensors with H_i, W_i multiples of patch_size. Patches of all
images are concatenated into one sequence of N = sum(rows_i * cols_i) tokens (row-major per image);
attention is block-diagonal (a patch only sees patches of its own image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionEncoderArgs
from .attention import block_diagonal_attention
from .layers import AttentionWeights, FeedForward, RMSNorm
from .rope import apply_rope, image_patch_positions, vision_rope_angles


class VisionBlock(nn.Module):
    def __init__(self, args: VisionEncoderArgs):
        super().__init__()
        h = args.num_attention_heads
        self.attention = AttentionWeights(args.hidden_size, h, h, args.head_dim)
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.feed_forward = FeedForward(args.hidden_size, args.intermediate_size)

    def forward(self, x, angles, cu_seqlens):
        # x (N, dim); angles (N, D/2) fp32; cu_seqlens (n_images + 1,)
        q, k, v = self.attention.qkv(self.attention_norm(x))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        o = block_diagonal_attention(q, k, v, cu_seqlens)  # (N, H, D)
        h = x + self.attention.wo(o.reshape(x.shape[0], -1))
        return h + self.feed_forward(self.ffn_norm(h))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionEncoderArgs):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(args) for _ in range(args.num_hidden_layers))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionEncoderArgs):
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                    stride=args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, args.norm_eps)
        self.transformer = VisionTransformer(args)

    def patch_grids(self, images: list[torch.Tensor]) -> list[tuple[int, int]]:
        p = self.args.patch_size
        return [(img.shape[-2] // p, img.shape[-1] // p) for img in images]

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: list of (C, H, W) -> (N, hidden_size) features, N = total patches."""
        dtype = self.patch_conv.weight.dtype
        grids = self.patch_grids(images)
        # (dim, rows, cols) per image -> (rows*cols, dim), row-major
        x = torch.cat([self.patch_conv(img[None].to(dtype))[0].flatten(1).t() for img in images])
        x = self.ln_pre(x)
        positions = image_patch_positions(grids, device=x.device)
        angles = vision_rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        sizes = [r * c for r, c in grids]
        cu = [0]
        for s in sizes:
            cu.append(cu[-1] + s)
        for layer in self.transformer.layers:
            x = layer(x, angles, cu)
        return x


class VisionLanguageAdapter(nn.Module):
    """w_out(GELU_erf(w_in x)): vision dim -> text dim."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__()
        self.w_in = nn.Linear(in_dim, out_dim, bias=bias)
        self.w_out = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class PatchMerger(nn.Module):
    """Mistral3: per image, each merge x merge block of patch features -> one token.
    Merged feature index = d * m^2 + kh * m + kw (torch unfold order); blocks in row-major order."""

    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, patch_grids: list[tuple[int, int]]) -> torch.Tensor:
        m = self.merge
        out = []
        for feats, (rows, cols) in zip(x.split([r * c for r, c in patch_grids]), patch_grids):
            d = feats.shape[-1]
            grid = feats.view(rows, cols, d).permute(2, 0, 1)[None]  # (1, d, rows, cols)
            blocks = F.unfold(grid, kernel_size=m, stride=m)  # (1, d*m*m, n_blocks)
            out.append(blocks[0].t())
        return self.merging_layer(torch.cat(out))
