"""Reference Pixtral model: vision encoder -> (Mistral3: norm + patch merger) -> GELU adapter -> image
features scattered into the [IMG] slots of the token embeddings -> Mistral decoder.

Module names equal the Mistral checkpoint keys, so `load_state_dict` takes a Mistral-format state dict
as is (text keys at top level, vision under `vision_encoder.`, ...).
"""
from __future__ import annotations

import torch

from ..config import PixtralArgs
from .fp8_linear import decode_mode
from .layers import RMSNorm
from .transformer import KVCache, Transformer
from .vision_encoder import PatchMerger, VisionEncoder, VisionLanguageAdapter


class PixtralModel(Transformer):
    def __init__(self, args: PixtralArgs):
        super().__init__(args.text)
        self.pixtral_args = args
        v = args.vision
        self.vision_encoder = VisionEncoder(v)
        if v.add_pre_mm_projector_layer_norm:
            self.pre_mm_projector_norm = RMSNorm(v.hidden_size, v.norm_eps)
        if v.spatial_merge_size > 1:
            self.patch_merger = PatchMerger(v.hidden_size, v.spatial_merge_size)
        self.vision_language_adapter = VisionLanguageAdapter(v.hidden_size, args.text.dim, v.adapter_bias)

    @classmethod
    def from_state_dict(cls, args: PixtralArgs, sd: dict[str, torch.Tensor]) -> "PixtralModel":
        """Built on meta, the tensors assigned (no copy); FP8 decoder linears in `sd` become Fp8Linear, int4
        ones (`weight_packed`) Int4Linear."""
        from .fp8_linear import install_fp8_linears
        from .int4_linear import install_int4_linears
        with torch.device("meta"):
            model = cls(args)
        install_fp8_linears(model, sd)
        install_int4_linears(model, sd)
        model.load_state_dict(sd, assign=True, strict=True)
        return model.eval()

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images (C, H, W) each -> (n_image_tokens, text dim): one row per [IMG] token, prompt order."""
        x = self.vision_encoder(images)
        if hasattr(self, "pre_mm_projector_norm"):
            x = self.pre_mm_projector_norm(x)
        if hasattr(self, "patch_merger"):
            x = self.patch_merger(x, self.vision_encoder.patch_grids(images))
        return self.vision_language_adapter(x)

    def embed(self, tokens: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens (T,) -> (T, dim); rows at [IMG] tokens replaced by image features, in order.
        [IMG_BREAK] / [IMG_END] keep their text embeddings."""
        h = self.tok_embeddings(tokens)
        slots = tokens == self.pixtral_args.vision.image_token_id
        n_slots = int(slots.sum())
        if images:
            feats = self.image_features(images).to(h.dtype)
            if feats.shape[0] != n_slots:
                raise ValueError(f"{n_slots} [IMG] tokens in the prompt but the images give {feats.shape[0]} features")
            h = h.clone()
            h[slots] = feats
        elif n_slots:
            raise ValueError(f"{n_slots} [IMG] tokens in the prompt but no images were given")
        return h

    def forward_tokens(self, tokens: torch.Tensor, images: list[torch.Tensor] | None = None, start_pos: int = 0,
                       cache: KVCache | None = None) -> torch.Tensor:
        """tokens (T,) (+ images for the [IMG] slots) -> logits (T, vocab) fp32."""
        return self.forward(self.embed(tokens, images), start_pos, cache)

    @torch.no_grad()
    def generate(self, tokens: list[int], images: list[torch.Tensor] | None = None, max_new_tokens: int = 16,
                 eos_id: int | None = 2) -> list[int]:
        """Greedy decoding through the KV cache. Returns the new token ids (EOS included if produced)."""
        dev = self.tok_embeddings.weight.device
        cache = KVCache.empty(self.args, len(tokens) + max_new_tokens, device=dev,
                              dtype=self.tok_embeddings.weight.dtype)
        logits = self.forward_tokens(torch.tensor(tokens, device=dev), images, 0, cache)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            with decode_mode(self):      # FP8: decode keeps activations unquantised (reference/fp8_linear.py)
                logits = self.forward_tokens(torch.tensor([nxt], device=dev), None, cache.length, cache)
        return out
