"""Model configuration as dataclasses, read from a checkpoint's own files.

Three parts, named as Mistral's params.json names them:
  VisionEncoderArgs  - the Pixtral-ViT (`vision_encoder` block of params.json)
  TransformerArgs    - the text decoder (top level of params.json)
  PixtralArgs        - both, plus the adapter / patch-merger switches

Readers: `from_params_json` (Mistral format) and `from_hf_config` (HF LlavaConfig with a Pixtral vision
tower, or Mistral3Config). Presets: PIXTRAL_12B, PIXTRAL_LARGE, MISTRAL_SMALL_31, and `tiny()` for tests.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing a field or holds a value this runtime cannot serve."""


@dataclass(frozen=True)
class VisionEncoderArgs:
    hidden_size: int = 1024
    num_channels: int = 3
    image_size: int = 1024  # max image side in pixels
    patch_size: int = 16
    rope_theta: float = 10000.0
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    adapter_bias: bool = True
    spatial_merge_size: int = 1  # 2 for Mistral-Small-3.1 (patch merger)
    add_pre_mm_projector_layer_norm: bool = False
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TransformerArgs:
    dim: int = 5120
    n_layers: int = 40
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    rope_theta: float = 1e9
    norm_eps: float = 1e-5
    vocab_size: int = 131072
    max_seq_len: int = 131072


@dataclass(frozen=True)
class PixtralArgs:
    text: TransformerArgs = field(default_factory=TransformerArgs)
    vision: VisionEncoderArgs = field(default_factory=VisionEncoderArgs)
    name: str = "custom"

    @property
    def patch_merger(self) -> bool:
        return self.vision.spatial_merge_size > 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_params_json(cls, path: str | Path) -> "PixtralArgs":
        """Mistral format: `params.json` with a `vision_encoder` block."""
        path = Path(path)
        try:
            p = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read params.json ({exc})") from exc
        _require(p, ["dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size"], path)
        ve = p.get("vision_encoder")
        if ve is None:
            raise ConfigError(f"{path}: no 'vision_encoder' block: this is a text-only model, not Pixtral")
        _require(ve, ["hidden_size", "patch_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "image_token_id"], path, prefix="vision_encoder.")
        text = TransformerArgs(
            dim=p["dim"], n_layers=p["n_layers"], head_dim=p.get("head_dim", p["dim"] // p["n_heads"]),
            hidden_dim=p["hidden_dim"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
            rope_theta=float(p.get("rope_theta", 1e9)), norm_eps=float(p["norm_eps"]),
            vocab_size=p["vocab_size"], max_seq_len=int(p.get("max_seq_len", p.get("max_position_embeddings", 131072))),
        )
        vision = VisionEncoderArgs(
            hidden_size=ve["hidden_size"], num_channels=ve.get("num_channels", 3),
            image_size=ve.get("max_image_size", ve.get("image_size", 1024)), patch_size=ve["patch_size"],
            rope_theta=float(ve.get("rope_theta", 10000.0)), intermediate_size=ve["intermediate_size"],
            num_hidden_layers=ve["num_hidden_layers"], num_attention_heads=ve["num_attention_heads"],
            image_token_id=ve["image_token_id"],
            image_break_token_id=ve.get("image_break_token_id", 12),
            image_end_token_id=ve.get("image_end_token_id", 13),
            adapter_bias=bool(ve.get("adapter_bias", True)),
            spatial_merge_size=int(ve.get("spatial_merge_size", 1)),
            add_pre_mm_projector_layer_norm=bool(ve.get("add_pre_mm_projector_layer_norm", False)),
        )
        return cls(text=text, vision=vision, name=str(p.get("name", "mistral-format")))

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "PixtralArgs":
        """HF format: `config.json` of a LlavaForConditionalGeneration (Pixtral) or Mistral3 model."""
        path = Path(path)
        try:
            c = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config.json ({exc})") from exc
        if "text_config" not in c or "vision_config" not in c:
            raise ConfigError(f"{path}: expected a Llava/Mistral3 config with text_config and vision_config")
        t, v = c["text_config"], c["vision_config"]
        is_m3 = c.get("model_type") == "mistral3" or "Mistral3" in "".join(c.get("architectures", []))
        _require(t, ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"], path,
                 prefix="text_config.")
        _require(v, ["hidden_size", "patch_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"], path, prefix="vision_config.")
        act = v.get("hidden_act", "gelu")
        if act != "silu":
            raise ConfigError(f"{path}: vision_config.hidden_act is {act!r}; Pixtral vision towers use 'silu'")
        rope = t.get("rope_theta") or (t.get("rope_parameters") or {}).get("rope_theta") or 1e9
        vrope = v.get("rope_theta") or (v.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        text = TransformerArgs(
            dim=t["hidden_size"], n_layers=t["num_hidden_layers"],
            head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
            hidden_dim=t["intermediate_size"], n_heads=t["num_attention_heads"],
            n_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]), rope_theta=float(rope),
            norm_eps=float(t.get("rms_norm_eps", 1e-5)), vocab_size=t.get("vocab_size", 131072),
            max_seq_len=int(t.get("max_position_embeddings", 131072)),
        )
        image_token = c.get("image_token_index", c.get("image_token_id", 10))
        # HF keeps [IMG_BREAK]/[IMG_END] in the processor, not config.json; the tokenizer (mistral_common)
        # is the authority for them. Defaults: tekken ids 12/13, SentencePiece v7m1 (vocab 32768) 14/15.
        sp = t.get("vocab_size") == 32768
        brk = c.get("image_break_token_id", 14 if sp else 12)
        end = c.get("image_end_token_id", 15 if sp else 13)
        vision = VisionEncoderArgs(
            hidden_size=v["hidden_size"], num_channels=v.get("num_channels", 3),
            image_size=v.get("image_size", 1024), patch_size=v["patch_size"], rope_theta=float(vrope),
            intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], image_token_id=image_token,
            image_break_token_id=brk, image_end_token_id=end,
            adapter_bias=bool(c.get("multimodal_projector_bias", not is_m3)),
            spatial_merge_size=int(c.get("spatial_merge_size", 2 if is_m3 else 1)),
            add_pre_mm_projector_layer_norm=is_m3,
            norm_eps=float(v.get("layer_norm_eps", 1e-5)),
        )
        if vision.hidden_size // vision.num_attention_heads != v.get("head_dim", vision.head_dim):
            raise ConfigError(f"{path}: vision head_dim {v.get('head_dim')} != hidden_size / num_attention_heads")
        return cls(text=text, vision=vision, name=str(c.get("_name_or_path", "hf-format")) or "hf-format")

    # ------------------------------------------------------------------ writers
    def to_params_json(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        ve = {
            "hidden_size": v.hidden_size, "num_channels": v.num_channels, "image_size": v.image_size,
            "max_image_size": v.image_size, "patch_size": v.patch_size, "rope_theta": v.rope_theta,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "image_token_id": v.image_token_id,
            "image_break_token_id": v.image_break_token_id, "image_end_token_id": v.image_end_token_id,
            "adapter_bias": v.adapter_bias, "spatial_merge_size": v.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": v.add_pre_mm_projector_layer_norm,
        }
        if v.spatial_merge_size > 1:
            ve["mm_projector_id"] = "patch_merge"
        return {
            "dim": t.dim, "n_layers": t.n_layers, "head_dim": t.head_dim, "hidden_dim": t.hidden_dim,
            "n_heads": t.n_heads, "n_kv_heads": t.n_kv_heads, "rope_theta": t.rope_theta,
            "norm_eps": t.norm_eps, "vocab_size": t.vocab_size, "max_seq_len": t.max_seq_len,
            "vision_encoder": ve,
        }

    def to_hf_config(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        text_config = {
            "model_type": "mistral", "hidden_size": t.dim, "num_hidden_layers": t.n_layers,
            "head_dim": t.head_dim, "intermediate_size": t.hidden_dim, "num_attention_heads": t.n_heads,
            "num_key_value_heads": t.n_kv_heads, "rope_theta": t.rope_theta, "rms_norm_eps": t.norm_eps,
            "vocab_size": t.vocab_size, "max_position_embeddings": t.max_seq_len, "sliding_window": None,
            "tie_word_embeddings": False, "hidden_act": "silu",
        }
        vision_config = {
            "model_type": "pixtral", "hidden_size": v.hidden_size, "num_channels": v.num_channels,
            "image_size": v.image_size, "patch_size": v.patch_size, "rope_theta": v.rope_theta,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "head_dim": v.head_dim, "hidden_act": "silu",
        }
        cfg = {
            "text_config": text_config, "vision_config": vision_config,
            "image_token_index": v.image_token_id, "projector_hidden_act": "gelu",
            "image_break_token_id": v.image_break_token_id, "image_end_token_id": v.image_end_token_id,
            "vision_feature_layer": -1, "tie_word_embeddings": False,
        }
        if self.patch_merger:
            cfg.update({"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
                        "spatial_merge_size": v.spatial_merge_size, "multimodal_projector_bias": v.adapter_bias})
        else:
            cfg.update({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                        "vision_feature_select_strategy": "full", "multimodal_projector_bias": v.adapter_bias})
        return cfg


def _require(d: dict, keys: list[str], path: Path, prefix: str = "") -> None:
    missing = [prefix + k for k in keys if k not in d]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")


# ---------------------------------------------------------------------- presets
PIXTRAL_12B = PixtralArgs(
    name="Pixtral-12B-2409",
    text=TransformerArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                         rope_theta=1e9, norm_eps=1e-5, vocab_size=131072),
    vision=VisionEncoderArgs(hidden_size=1024, image_size=1024, patch_size=16, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16, image_token_id=10,
                             image_break_token_id=12, image_end_token_id=13, adapter_bias=True),
)

PIXTRAL_LARGE = PixtralArgs(
    name="Pixtral-Large-Instruct-2411",
    text=TransformerArgs(dim=12288, n_layers=88, head_dim=128, hidden_dim=28672, n_heads=96, n_kv_heads=8,
                         rope_theta=1e9, norm_eps=1e-5, vocab_size=32768),
    vision=VisionEncoderArgs(hidden_size=1408, image_size=1024, patch_size=16, intermediate_size=6144,
                             num_hidden_layers=40, num_attention_heads=16, image_token_id=10,
                             image_break_token_id=14, image_end_token_id=15, adapter_bias=False),
)

MISTRAL_SMALL_31 = PixtralArgs(
    name="Mistral-Small-3.1-24B-2503",
    text=TransformerArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32, n_kv_heads=8,
                         rope_theta=1e9, norm_eps=1e-5, vocab_size=131072),
    vision=VisionEncoderArgs(hidden_size=1024, image_size=1540, patch_size=14, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16, image_token_id=10,
                             image_break_token_id=12, image_end_token_id=13, adapter_bias=False,
                             spatial_merge_size=2, add_pre_mm_projector_layer_norm=True),
)

PRESETS = {p.name: p for p in (PIXTRAL_12B, PIXTRAL_LARGE, MISTRAL_SMALL_31)}


def tiny(merge: bool = False, vocab_size: int = 131072) -> PixtralArgs:
    """A few-layer config of the real architecture for CPU tests. The vocab stays 131072 by default so
    the real tekken tokenizer's ids are valid; head dims are the real ones (64 vision, 128 text)."""
    return PixtralArgs(
        name="tiny-mistral3" if merge else "tiny-pixtral",
        text=TransformerArgs(dim=256, n_layers=2, head_dim=128, hidden_dim=512, n_heads=4, n_kv_heads=2,
                             rope_theta=1e9, norm_eps=1e-5, vocab_size=vocab_size, max_seq_len=8192),
        vision=VisionEncoderArgs(hidden_size=128, image_size=1540 if merge else 1024,
                                 patch_size=14 if merge else 16, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, adapter_bias=not merge,
                                 spatial_merge_size=2 if merge else 1, add_pre_mm_projector_layer_norm=merge),
    )


def preset(name: str) -> PixtralArgs:
    """A preset by name: one of PRESETS, or "tiny" / "tiny-mistral3" (tests). ValueError lists the names.
    "NAME:layers=N": that preset's first N text-decoder layers only (every shape the real one's, the vision
    encoder whole): tests and benchmarks that need a model's real shapes on a machine its full size does not
    fit (Pixtral-Large on one GPU). Random weights are drawn per tensor name, so these N layers are the full
    model's first N."""
    base, sep, opt = name.partition(":")
    if sep:
        key, _, val = opt.partition("=")
        full = preset(base)
        if key != "layers" or not val.isdigit() or not 1 <= int(val) <= full.text.n_layers:
            raise ValueError(f"preset {name!r}: after the ':' give layers=N with 1 <= N <= "
                             f"{full.text.n_layers} (the layers of {base})")
        return dataclasses.replace(full, name=f"{full.name}:layers={int(val)}",
                                   text=dataclasses.replace(full.text, n_layers=int(val)))
    if name == "tiny":
        return tiny()
    if name == "tiny-mistral3":
        return tiny(merge=True)
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"unknown preset {name!r}; one of tiny, tiny-mistral3, {', '.join(PRESETS)}")
