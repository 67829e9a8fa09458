"""Checkpoint detection, validation and loading for both layouts.

Mistral format: `params.json` + `consolidated.safetensors` (or `consolidated-0000N-of-0000M.safetensors`
shards); keys are this runtime's own names (module names of pixtral_rt.reference.model.PixtralModel).
HF format: `config.json` (Llava with a Pixtral tower, or Mistral3) + `model*.safetensors` (+ index json);
keys in either the legacy (`language_model.model.*`, `vision_tower.*`) or the newer
(`model.language_model.*`, `model.vision_tower.*`, `lm_head`) layout. HF permutes the rows of q and k
(text and vision) for rotate-half RoPE; they are un-permuted on load so every path sees Mistral's
interleaved layout.

Everything that can be checked is checked before a byte of weights is read: files present (shards named
by the index), safetensors headers parse, every tensor's bytes lie inside its file (truncation), no
missing or unexpected tensor, shapes and dtypes. Errors name the file and the tensor. Loading then
memory-maps each file and places each tensor straight on the target device in the target dtype.

FP8 (HF format only): a config.json with a `quantization_config` (compressed-tensors FP8-dynamic, see
pixtral_rt.quantization_config) makes the text decoder's linears F8_E4M3 [out, in] with a
`<module>.weight_scale` [out, 1] each. They are loaded as pixtral_rt.fp8's state-dict contract says:
float8_e4m3fn weights (never cast to the load dtype), float32 (N, 1) scales, q/k rows and their scales
un-permuted together. `load_state_dict(..., quantization="fp8")` quantises a bf16 checkpoint's decoder
linears the same way, one tensor at a time as it arrives.

Int4 (HF format only): a `quantization_config` with format "pack-quantized" (compressed-tensors W4A16, see
pixtral_rt.quantization_config) makes each quantised decoder linear three tensors, `<module>.weight_packed`
I32 [out, in / 8], `<module>.weight_scale` [out, in / group] and `<module>.weight_shape` [2] (whose two values
are read and checked while planning: 16 bytes, the only tensor data read before loading). They are loaded
as pixtral_rt.int4's state-dict contract says: int32 `weight_packed` in the checkpoint packing and float32
`weight_scale`, rows of both un-permuted together; no `.weight`. `quantization="int4"` quantises a bf16
checkpoint's decoder linears by round to nearest (int4.quantize_and_pack, group 128) on the target device,
one tensor at a time as it arrives. Tensor parallelism is not supported with int4 (refused).

Tensor parallelism: `load_state_dict(..., shard=(rank, world))` reads only this rank's slice of each
sharded decoder linear (pixtral_rt.sharding: wq/wk/wv/w1/w3 by rows, wo/w2 by columns) straight from the
file, as byte ranges; replicated tensors are read whole.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import fp8
from . import int4
from . import sharding
from .config import ConfigError, PixtralArgs
from .quantization_config import QuantizationConfig


class CheckpointError(RuntimeError):
    """A checkpoint folder or file cannot be used; the message names the file and tensor."""


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # unquantised tensors
_READ_DTYPES = {**_ST_DTYPES, "F8_E4M3": fp8.FP8_DTYPE, "I32": torch.int32}  # what the readers turn raw bytes into
QUANTIZATIONS = ("fp8", "int4")  # load_state_dict(quantization=...)
_INT4_PARAMS = ("weight_packed", "weight_scale", "weight_shape")  # a pack-quantized linear's tensors
_ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class TensorSource:
    file: Path
    key: str  # key inside the file
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    unpermute_heads: int = 0  # >0: undo HF's rotary row permutation with this many heads
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0


@dataclass
class CheckpointPlan:
    """What will be loaded, from where: built and validated without reading weight data."""
    folder: Path
    format: str  # "mistral" or "hf"
    args: PixtralArgs
    files: list[Path]
    # our key -> source (incl. weight_scale; an int4 linear as weight_packed + weight_scale, no weight)
    sources: dict[str, TensorSource] = field(default_factory=dict)
    quantization: QuantizationConfig | None = None  # config.json's quantization_config (FP8 / int4), None: bf16

    def describe(self) -> str:
        n = sum(_numel(s.shape) * (int4.PACK if k.endswith("_packed") else 1)
                for k, s in self.sources.items() if not k.endswith("_scale"))
        text = (f"{self.folder}: {self.format} format ({_config_name(self.format)}), "
                f"{len(self.files)} safetensors file(s), {len(self.sources)} tensors, {n / 1e9:.2f} B params")
        if self.quantization is not None and self.quantization.scheme == "int4":
            n4 = sum(k.endswith(".weight_packed") for k in self.sources)
            n_lin = n4 + sum(fp8.is_quantized_weight(k) for k in self.sources)
            text += (f"; int4 (compressed-tensors pack-quantized W4A16, group {self.quantization.group_size}): "
                     f"{n4} of {n_lin} decoder linears int4 with per-group scales, the rest (embeddings, lm_head, "
                     f"norms, vision tower, adapter{', ignored linears' if n4 < n_lin else ''}) unquantised")
        elif self.quantization is not None:
            linears = [s for k, s in self.sources.items() if fp8.is_quantized_weight(k)]
            n8 = sum(s.dtype == "F8_E4M3" for s in linears)
            text += (f"; FP8 (compressed-tensors float-quantized): {n8} of {len(linears)} decoder linears FP8 e4m3 "
                     f"with per-channel scales, the rest (embeddings, lm_head, norms, vision tower, adapter"
                     f"{', ignored linears' if n8 < len(linears) else ''}) unquantised")
        return text

    def shard_bytes(self, rank: int, world: int, lm_head: str | None = None) -> int:
        """Tensor-data bytes that load_state_dict(self, shard=(rank, world)) reads (all tensors): this rank's
        slice of each sharded tensor plus every replicated tensor whole."""
        rank, world = _check_shard(self, (rank, world), lm_head)
        return sum(sum(n for _, n in _slice_ranges(k, s, rank, world, lm_head)[0])
                   for k, s in self.sources.items())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------- detection
def detect_format(folder: str | Path) -> str:
    """'mistral' if params.json + consolidated*.safetensors, 'hf' if config.json + model*.safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a checkpoint folder)")
    has_params = (folder / "params.json").is_file()
    has_config = (folder / "config.json").is_file()
    mistral_files = sorted(folder.glob("consolidated*.safetensors"))
    hf_files = sorted(folder.glob("model*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if has_params and mistral_files:
        return "mistral"
    if has_config and hf_files:
        return "hf"
    if has_params:
        raise CheckpointError(f"{folder}: params.json found but no consolidated*.safetensors: incomplete "
                              f"Mistral-format download?")
    if has_config:
        raise CheckpointError(f"{folder}: config.json found but no model*.safetensors or index: incomplete "
                              f"HF-format download?")
    raise CheckpointError(f"{folder}: neither params.json (Mistral format) nor config.json (HF format) found")


# ---------------------------------------------------------------------------------------- headers
def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated or empty safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    data_size = size - 8 - n
    for key, meta in header.items():
        if key == "__data_start__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {key!r}: malformed header entry") from exc
        if b > data_size:
            raise CheckpointError(f"{path}: tensor {key!r} ends at byte {b} of the data section but the file "
                                  f"holds only {data_size}: truncated file (re-download it)")
        if dtype in _ST_ITEMSIZE and b - a != _numel(shape) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {key!r}: {b - a} bytes for shape {shape} {dtype}: corrupt header")
    return header


def _list_files(folder: Path, fmt: str) -> list[Path]:
    """Safetensors files of a checkpoint; with an index json, every shard it names must exist."""
    index = folder / ("consolidated.safetensors.index.json" if fmt == "mistral" else "model.safetensors.index.json")
    pattern = "consolidated*.safetensors" if fmt == "mistral" else "model*.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: {len(missing)} shard(s) listed in {index.name} are absent "
                                  f"(half-downloaded folder?): {', '.join(missing[:5])}")
        return [folder / n for n in names]
    files = sorted(folder.glob(pattern))
    if not files:
        raise CheckpointError(f"{folder}: no {pattern} files")
    m = re.compile(r".*-(\d+)-of-(\d+)\.safetensors$")
    totals = {int(m.match(f.name).group(2)) for f in files if m.match(f.name)}
    if totals:
        total = max(totals)
        present = {int(m.match(f.name).group(1)) for f in files if m.match(f.name)}
        absent = sorted(set(range(1, total + 1)) - present)
        if absent:
            raise CheckpointError(f"{folder}: shard(s) {absent} of {total} are absent (half-downloaded folder?)")
    return files


# ---------------------------------------------------------------------------------------- HF key map
_HF_PREFIXES = [
    ("model.language_model.", "LM."), ("language_model.model.", "LM."), ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "VT."), ("vision_tower.", "VT."),
    ("model.multi_modal_projector.", "MP."), ("multi_modal_projector.", "MP."),
]
_HF_RENAMES = [
    (r"^LM\.embed_tokens\.", "tok_embeddings."), (r"^LM\.norm\.", "norm."), (r"^lm_head\.", "output."),
    (r"^LM\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
    (r"^LM\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
    (r"^LM\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
    (r"^LM\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
    (r"^LM\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^LM\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^LM\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"^LM\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^LM\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^VT\.(.*)attention\.q_proj\.", r"vision_encoder.\1attention.wq."),
    (r"^VT\.(.*)attention\.k_proj\.", r"vision_encoder.\1attention.wk."),
    (r"^VT\.(.*)attention\.v_proj\.", r"vision_encoder.\1attention.wv."),
    (r"^VT\.(.*)attention\.o_proj\.", r"vision_encoder.\1attention.wo."),
    (r"^VT\.(.*)feed_forward\.gate_proj\.", r"vision_encoder.\1feed_forward.w1."),
    (r"^VT\.(.*)feed_forward\.down_proj\.", r"vision_encoder.\1feed_forward.w2."),
    (r"^VT\.(.*)feed_forward\.up_proj\.", r"vision_encoder.\1feed_forward.w3."),
    (r"^VT\.", "vision_encoder."),
    (r"^MP\.linear_1\.", "vision_language_adapter.w_in."), (r"^MP\.linear_2\.", "vision_language_adapter.w_out."),
    (r"^MP\.norm\.", "pre_mm_projector_norm."), (r"^MP\.patch_merger\.", "patch_merger."),
]


def hf_to_mistral_key(key: str) -> str | None:
    """HF key (either layout) -> this runtime's key, or None if it is not a Pixtral weight."""
    k = key
    for old, new in _HF_PREFIXES:
        if k.startswith(old):
            k = new + k[len(old):]
            break
    for pat, rep in _HF_RENAMES:
        k2, n = re.subn(pat, rep, k)
        if n:
            return k2
    return None


def mistral_to_hf_key(key: str, legacy: bool = False) -> str:
    """Inverse of hf_to_mistral_key, for the random-checkpoint writer."""
    lm, vt, mp, head = (("language_model.model.", "vision_tower.", "multi_modal_projector.", "language_model.lm_head.")
                        if legacy else
                        ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head."))
    rules = [
        (r"^tok_embeddings\.", lm + "embed_tokens."), (r"^norm\.", lm + "norm."), (r"^output\.", head),
        (r"^layers\.(\d+)\.attention\.w([qkvo])\.", lambda m: f"{lm}layers.{m[1]}.self_attn.{m[2]}_proj."),
        (r"^layers\.(\d+)\.attention_norm\.", lm + r"layers.\1.input_layernorm."),
        (r"^layers\.(\d+)\.ffn_norm\.", lm + r"layers.\1.post_attention_layernorm."),
        (r"^layers\.(\d+)\.feed_forward\.w1\.", lm + r"layers.\1.mlp.gate_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w2\.", lm + r"layers.\1.mlp.down_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w3\.", lm + r"layers.\1.mlp.up_proj."),
        (r"^vision_encoder\.(.*)attention\.w([qkvo])\.", lambda m: f"{vt}{m[1]}attention.{m[2]}_proj."),
        (r"^vision_encoder\.(.*)feed_forward\.w1\.", vt + r"\1feed_forward.gate_proj."),
        (r"^vision_encoder\.(.*)feed_forward\.w2\.", vt + r"\1feed_forward.down_proj."),
        (r"^vision_encoder\.(.*)feed_forward\.w3\.", vt + r"\1feed_forward.up_proj."),
        (r"^vision_encoder\.", vt),
        (r"^vision_language_adapter\.w_in\.", mp + "linear_1."), (r"^vision_language_adapter\.w_out\.", mp + "linear_2."),
        (r"^pre_mm_projector_norm\.", mp + "norm."), (r"^patch_merger\.", mp + "patch_merger."),
    ]
    for pat, rep in rules:
        k2, n = re.subn(pat, rep, key)
        if n:
            return k2
    raise KeyError(key)


def rotary_heads(key: str, args: PixtralArgs) -> int:
    """Number of heads whose rows HF permutes for this (our-named) tensor, 0 if none."""
    if re.fullmatch(r"layers\.\d+\.attention\.wq\.weight", key):
        return args.text.n_heads
    if re.fullmatch(r"layers\.\d+\.attention\.wk\.weight", key):
        return args.text.n_kv_heads
    if re.fullmatch(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]\.weight", key):
        return args.vision.num_attention_heads
    return 0


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral interleaved rows -> HF rotate-half rows (what HF's conversion script does)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


# ---------------------------------------------------------------------------------------- planning
def expected_shapes(args: PixtralArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape (from the reference model built on `meta`)."""
    from .reference.model import PixtralModel
    with torch.device("meta"):
        model = PixtralModel(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plan_checkpoint(folder: str | Path, fmt: str | None = None) -> CheckpointPlan:
    """Detect the format, read the config, and validate every tensor's presence, shape, dtype and bytes
    (for FP8 checkpoints also every weight_scale), all before a byte of weights is read."""
    folder = Path(folder)
    fmt = fmt or detect_format(folder)
    if fmt not in ("mistral", "hf"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r} (expected 'mistral' or 'hf')")
    try:
        args = (PixtralArgs.from_params_json(folder / "params.json") if fmt == "mistral"
                else PixtralArgs.from_hf_config(folder / "config.json"))
        quant = _read_quantization(folder, fmt)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    files = _list_files(folder, fmt)
    want = expected_shapes(args)
    plan = CheckpointPlan(folder=folder, format=fmt, args=args, files=files, quantization=quant)
    unexpected = []
    # checked once every file's header is read (a scale may sit in another shard): FP8 scales, or int4's
    # (our key, source) of weight_packed / weight_scale / weight_shape
    scales: list[TensorSource] = []
    int4_params: list[tuple[str, TensorSource]] = []
    is_int4 = quant is not None and quant.scheme == "int4"
    for path in files:
        header = read_safetensors_header(path)
        data_start = header.pop("__data_start__")
        for key, meta in header.items():
            last = key.rsplit(".", 1)[-1]
            if not (is_int4 and last in _INT4_PARAMS):
                _reject_quantization_parameter(path, key, meta, quant)
            ours = key if fmt == "mistral" else hf_to_mistral_key(key)
            if ours is not None and last in _INT4_PARAMS:     # weight_scale (FP8 or int4), int4's packed / shape
                base = ours.rsplit("_", 1)[0]                  # layers.0.attention.wq.weight
                what = {"weight_scale": "a weight scale", "weight_packed": "a packed int4 weight",
                        "weight_shape": "the shape of a packed int4 weight"}[last]
                if not fp8.is_quantized_weight(base):
                    raise CheckpointError(f"{path}: tensor {key!r} is {what} of a layer this runtime keeps "
                                          f"unquantised: FP8 and int4 are read only for the text decoder's linears "
                                          f"(embeddings, lm_head, vision tower and adapter must be BF16/F16/F32)")
                if quant is None:
                    raise CheckpointError(f"{path}: tensor {key!r} is {what} but {_config_name(fmt)} "
                                          f"has no quantization_config: {_NO_QUANT_HINT[fmt]}")
                a, b = meta["data_offsets"]
                src = TensorSource(path, key, tuple(meta["shape"]), meta["dtype"],
                                   rotary_heads(base, args) if fmt == "hf" else 0, data_start + a, b - a)
                if is_int4:
                    int4_params.append((ours, src))
                else:
                    scales.append(src)
                continue
            if ours is None or ours not in want:
                unexpected.append(f"{key} ({path.name})")
                continue
            if ours in plan.sources:
                raise CheckpointError(f"{path}: tensor {key!r} also appears in {plan.sources[ours].file.name}")
            shape = tuple(meta["shape"])
            if shape != want[ours]:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {list(shape)}, expected "
                                      f"{list(want[ours])} for this config")
            _check_dtype(path, key, ours, meta["dtype"], fmt, quant)
            a, b = meta["data_offsets"]
            plan.sources[ours] = TensorSource(path, key, shape, meta["dtype"],
                                              rotary_heads(ours, args) if fmt == "hf" else 0, data_start + a, b - a)
    if is_int4:
        _attach_int4(plan, int4_params, want)
    missing = [k for k in want if k not in plan.sources and int4.packed_key(k) not in plan.sources]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing from the {fmt}-format checkpoint, "
                              f"e.g. {', '.join(missing[:4])}")
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} unexpected tensor(s) (wrong model or format?), "
                              f"e.g. {', '.join(unexpected[:4])}")
    if quant is not None:
        if not is_int4:
            _attach_scales(plan, scales)
        _check_fused_groups(plan)
    return plan


# ---------------------------------------------------------------------------------------- FP8 planning
_NO_QUANT_HINT = {
    "hf": "quantised (FP8 / int4) weights cannot be read without their scheme (bf16 config.json copied next to "
          "quantised weights?)",
    "mistral": "FP8 and int4 checkpoints are read in the HF compressed-tensors layout (config.json with "
               "quantization_config)",
}

# Tensors of other quantisation schemes, by the last part of their name: what each means.
_OTHER_SCHEMES = {
    "input_scale": "a static activation scale: static FP8 activation scales are not supported (this runtime "
                   "quantises activations per token at run time; use an FP8-dynamic checkpoint)",
    "input_zero_point": "an activation zero point: asymmetric quantisation is not supported",
    "weight_zero_point": "a weight zero point: asymmetric / integer quantisation is not supported",
    "weight_g_idx": "a GPTQ activation-order index: GPTQ checkpoints are not supported",
    "weight_packed": "packed integer weights (compressed-tensors pack-quantized int4), which need config.json's "
                     "quantization_config with format 'pack-quantized'",
    "weight_shape": "the shape of packed integer weights (pack-quantized int4), which need config.json's "
                    "quantization_config with format 'pack-quantized'",
    "weight_global_scale": "an NVFP4 global scale: FP4 checkpoints are not supported",
    "input_global_scale": "an NVFP4 global scale: FP4 checkpoints are not supported",
    "weight_scale_inv": "a block-wise FP8 scale (HF/DeepSeek 'fp8' layout): block-wise weight scales are not supported",
    "output_scale": "a static output scale: quantised outputs are not supported",
    "k_scale": "a KV-cache scale: a quantised KV cache is not supported",
    "v_scale": "a KV-cache scale: a quantised KV cache is not supported",
    "qscale_weight": "a Mistral-format quantisation scale: " + _NO_QUANT_HINT["mistral"],
    "qscale_act": "a Mistral-format quantisation scale: " + _NO_QUANT_HINT["mistral"],
}
_SUPPORTED_FP8 = ("supported are BF16/F16/F32 checkpoints, FP8 (F8_E4M3) decoder linears with per-channel "
                  "weight_scale in the compressed-tensors FP8-dynamic layout, and int4 decoder linears "
                  "(weight_packed + per-group weight_scale + weight_shape) in the compressed-tensors "
                  "pack-quantized W4A16 layout")


def _config_name(fmt: str) -> str:
    return "params.json" if fmt == "mistral" else "config.json"


def _read_quantization(folder: Path, fmt: str) -> QuantizationConfig | None:
    """config.json's quantization_config (validated), None if absent. A Mistral-format params.json that
    declares quantisation is refused: FP8 is read in the HF compressed-tensors layout only."""
    path = folder / _config_name(fmt)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    if fmt == "mistral":
        for name in ("quantization", "quantization_config"):
            if cfg.get(name):
                raise ConfigError(f"{path}: has a {name!r} block ({json.dumps(cfg[name])[:200]}): "
                                  f"{_NO_QUANT_HINT['mistral']}, e.g. pixtral-12b-FP8-dynamic; or load the bf16 "
                                  f"checkpoint with quantization='fp8' to quantise while loading")
        return None
    q = cfg.get("quantization_config")
    return None if q is None else QuantizationConfig.from_hf(q, path)


def _reject_quantization_parameter(path: Path, key: str, meta: dict, quant: QuantizationConfig | None = None
                                   ) -> None:
    """Tensors that only other quantisation schemes have (input_scale, zero points, packed ints without a
    pack-quantized config, ...)."""
    last = key.rsplit(".", 1)[-1]
    if last in _OTHER_SCHEMES:
        why = _OTHER_SCHEMES[last]
        if last == "weight_zero_point" and quant is not None and quant.scheme == "int4":
            why = "a weight zero point: asymmetric int4 is not supported (only symmetric W4A16)"
        raise CheckpointError(f"{path}: tensor {key!r} ({meta['dtype']} {meta['shape']}) is {why}; {_SUPPORTED_FP8}")


def _hf_module_names(ours: str) -> set[str]:
    """The HF module names of one of our weights, in both HF key layouts (an ignore list may be written in
    either: transformers renamed the modules between versions, and checkpoints exist of both)."""
    return {mistral_to_hf_key(ours, legacy).removesuffix(".weight") for legacy in (False, True)}


def is_ignored(quant: QuantizationConfig, ours: str) -> bool:
    """True if the checkpoint's quantization_config leaves this (our-named) weight unquantised."""
    return any(quant.ignores(m) for m in _hf_module_names(ours))


def _check_dtype(path: Path, key: str, ours: str, dtype: str, fmt: str, quant: QuantizationConfig | None) -> None:
    """Decoder linears: F8_E4M3 exactly when the quantization_config quantises them. Everything else
    (and every tensor of an unquantised checkpoint): BF16/F16/F32."""
    quantised = quant is not None and fp8.is_quantized_weight(ours) and not is_ignored(quant, ours)
    if quantised and quant.scheme == "int4":
        module = key.removesuffix(".weight")
        raise CheckpointError(f"{path}: tensor {key!r} is a dense {dtype} weight but config.json's "
                              f"quantization_config (pack-quantized int4) quantises this linear (its ignore list "
                              f"does not name {module!r}): expected {module}.weight_packed, .weight_scale and "
                              f".weight_shape")
    fp8_expected = quantised and quant.scheme == "fp8"
    if fp8_expected:
        if dtype != "F8_E4M3":
            module = key.removesuffix(".weight")
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype}; expected F8_E4M3: config.json's "
                                  f"quantization_config quantises this linear (its ignore list does not name "
                                  f"{module!r})")
        return
    if dtype == "F8_E4M3":
        if quant is None:
            why = f"{_config_name(fmt)} has no quantization_config: {_NO_QUANT_HINT[fmt]}"
        elif quant.scheme == "int4":
            why = "config.json's quantization_config is int4 (pack-quantized), not FP8"
        elif fp8.is_quantized_weight(ours):
            why = "config.json's quantization_config ignores this linear, so it must be unquantised"
        else:
            why = ("FP8 is read only for the text decoder's linears; embeddings, lm_head, norms, the vision tower "
                   "and the adapter must be unquantised")
        raise CheckpointError(f"{path}: tensor {key!r} has dtype F8_E4M3 but {why}")
    if dtype not in _ST_DTYPES:
        kind = ("integer: int8 / packed int4 quantised weights are not supported"
                if dtype.startswith(("I", "U")) else "not a supported floating-point type")
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype} ({kind}); expected BF16, F16 or F32 "
                              f"({_SUPPORTED_FP8})")


def _attach_scales(plan: CheckpointPlan, scales: list[TensorSource]) -> None:
    """Every F8 weight gets exactly one weight_scale of shape [out, 1] in BF16/F16/F32; a scale must
    belong to an F8 weight."""
    for s in scales:
        ours = hf_to_mistral_key(s.key) if plan.format == "hf" else s.key
        w = plan.sources[ours[:-6]]
        if ours in plan.sources:
            raise CheckpointError(f"{s.file}: tensor {s.key!r} also appears in {plan.sources[ours].file.name}")
        if w.dtype != "F8_E4M3":
            raise CheckpointError(f"{s.file}: tensor {s.key!r} is a weight scale but its weight {w.key!r} "
                                  f"({w.file.name}) is {w.dtype}, not F8_E4M3")
        if s.shape != (w.shape[0], 1):
            raise CheckpointError(f"{s.file}: tensor {s.key!r} has shape {list(s.shape)}; expected "
                                  f"[{w.shape[0]}, 1] (one scale per output channel, strategy 'channel')")
        if s.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{s.file}: tensor {s.key!r} has dtype {s.dtype}; expected BF16, F16 or F32")
        plan.sources[ours] = s
    for k, w in list(plan.sources.items()):
        if w.dtype == "F8_E4M3" and fp8.scale_key(k) not in plan.sources:
            raise CheckpointError(f"missing weight_scale for {w.key} in {w.file}: an FP8 weight needs its "
                                  f"per-channel scale ({w.key.removesuffix('.weight')}.weight_scale)")


_FUSED = (("attention", ("wq", "wk", "wv")), ("feed_forward", ("w1", "w3")))


def _check_fused_groups(plan: CheckpointPlan) -> None:
    """q/k/v and gate/up of one layer are fused into one matrix by the fast decoder: all quantised (FP8 or
    int4) or all not (vLLM refuses the same mix)."""
    scheme = plan.quantization.scheme.upper() if plan.quantization is not None else "FP8"
    for i in range(plan.args.text.n_layers):
        for block, names in _FUSED:
            srcs = [plan.sources.get(f"layers.{i}.{block}.{n}.weight") or
                    plan.sources[f"layers.{i}.{block}.{n}.weight_packed"] for n in names]
            kinds = {s.dtype in ("F8_E4M3", "I32") for s in srcs}
            if len(kinds) > 1:
                desc = ", ".join(f"{s.key} {s.dtype}" for s in srcs)
                raise CheckpointError(f"{plan.folder}: layer {i} mixes {scheme} and unquantised linears that are "
                                      f"fused into one matrix ({desc}): the ignore list of config.json must name "
                                      f"all of them or none")


def _read_weight_shape(src: TensorSource) -> list[int]:
    """The two values of an int4 linear's weight_shape tensor (I32 / I64 [2]): one small positioned read."""
    with open(src.file, "rb") as f:
        f.seek(src.offset)
        raw = f.read(src.nbytes)
    if len(raw) != src.nbytes:
        raise CheckpointError(f"{src.file}: unexpected end of file in tensor {src.key!r}")
    return list(struct.unpack("<2q" if src.dtype == "I64" else "<2i", raw))


def _attach_int4(plan: CheckpointPlan, params: list[tuple[str, TensorSource]], want: dict) -> None:
    """Every quantised decoder linear of a pack-quantized checkpoint: weight_packed I32 [N, K / 8], weight_scale
    float [N, K / G], weight_shape I32/I64 [2] holding [N, K], all three, nothing else; sources get the first
    two (weight_shape is consumed here)."""
    quant = plan.quantization
    G = quant.group_size
    by_base: dict[str, dict[str, TensorSource]] = {}
    for ours, s in params:
        base, _, kind = ours.rpartition("_")            # layers.0.attention.wq.weight, packed|scale|shape
        parts = by_base.setdefault(base, {})
        if kind in parts:
            raise CheckpointError(f"{s.file}: tensor {s.key!r} also appears in {parts[kind].file.name}")
        if is_ignored(quant, base):
            raise CheckpointError(f"{s.file}: tensor {s.key!r} is an int4 parameter but config.json's "
                                  f"quantization_config ignores this linear, so it must be unquantised "
                                  f"({s.key.rsplit('.', 1)[0]}.weight)")
        parts[kind] = s
    for base, parts in by_base.items():
        N, K = want[base]
        any_src = next(iter(parts.values()))
        module = any_src.key.rsplit(".", 1)[0]
        if "packed" not in parts:
            raise CheckpointError(f"{any_src.file}: tensor {any_src.key!r} belongs to an int4 linear but "
                                  f"{module}.weight_packed is missing")
        p = parts["packed"]
        if p.dtype != "I32":
            raise CheckpointError(f"{p.file}: tensor {p.key!r} has dtype {p.dtype}; expected I32 (eight 4-bit "
                                  f"values per int32, compressed-tensors pack-quantized)")
        if p.shape != (N, K // int4.PACK) or K % int4.PACK:
            raise CheckpointError(f"{p.file}: tensor {p.key!r} has shape {list(p.shape)}; expected "
                                  f"[{N}, {K // int4.PACK}] (eight 4-bit values per int32 along the {K} inputs of "
                                  f"this [{N}, {K}] linear)")
        if K % G:
            raise CheckpointError(f"{p.file}: {module} has {K} inputs, which do not split into groups of {G} "
                                  f"(config.json's quantization_config group_size)")
        for kind in ("scale", "shape"):
            if kind not in parts:
                raise CheckpointError(f"missing weight_{kind} for {p.key} in {p.file}: an int4 weight needs its "
                                      f"per-group scale and its shape ({module}.weight_{kind})")
        sc = parts["scale"]
        if sc.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{sc.file}: tensor {sc.key!r} has dtype {sc.dtype}; expected BF16, F16 or F32")
        if sc.shape != (N, K // G):
            raise CheckpointError(f"{sc.file}: tensor {sc.key!r} has shape {list(sc.shape)}; expected "
                                  f"[{N}, {K // G}] (one scale per output row and group of {G} inputs, strategy "
                                  f"'group')")
        sh = parts["shape"]
        if sh.dtype not in ("I32", "I64") or sh.shape != (2,):
            raise CheckpointError(f"{sh.file}: tensor {sh.key!r} is {sh.dtype} {list(sh.shape)}; expected an "
                                  f"I64 (or I32) [2] holding the unpacked weight's shape")
        values = _read_weight_shape(sh)
        if values != [N, K]:
            raise CheckpointError(f"{sh.file}: tensor {sh.key!r} holds {values}; expected [{N}, {K}] (the "
                                  f"unpacked shape of {module} for this config)")
        plan.sources[int4.packed_key(base)] = p
        plan.sources[int4.scale_key(base)] = sc


# ---------------------------------------------------------------------------------------- loading
def load_state_dict(plan: CheckpointPlan, device="cpu", dtype: torch.dtype = torch.bfloat16,
                    keys: Iterable[str] | None = None, progress: bool = True,
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    staged: bool | None = None, quantization: str | None = None,
                    shard: tuple[int, int] | None = None, stats: dict | None = None,
                    lm_head: str | None = None) -> dict[str, torch.Tensor]:
    """Load (a subset of) the planned tensors onto `device`; returns our-named tensors.

    Unquantised tensors come in `dtype`. FP8 follows pixtral_rt.fp8's contract: a decoder linear stays
    float8_e4m3fn (N, K) (never cast to `dtype`) and its `...weight_scale` is float32 (N, 1); HF's q/k
    row permutation is undone on both. `quantization="fp8"` quantises an unquantised checkpoint's decoder
    linears with fp8.quantize_weight on `device`, one tensor as it arrives (never the whole bf16 model);
    on an FP8 checkpoint it changes nothing. Int4 (pixtral_rt.int4's contract): a decoder linear of a
    pack-quantized checkpoint comes as int32 `...weight_packed` (N, K / 8) + float32 `...weight_scale`
    (N, K / G) and no `...weight`; `quantization="int4"` makes the same from an unquantised checkpoint by
    int4.quantize_and_pack on `device`, one tensor as it arrives; on an int4 checkpoint it changes nothing.
    Asking for the other scheme than a quantised checkpoint's own is a ValueError. `keys` selects tensors
    (an int4 linear's `...weight` selects its packed weight); the scale of a selected quantised weight comes
    with it. `transform(key, tensor)` sees each output tensor (a quantised weight and its scale apart).

    To a GPU (staged, the default there) each file is read with plain reads into two reusable pinned
    buffers and copied to the device chunk by chunk, so host memory stays at the staging buffers (no
    mapped file pages, no copy of the model). To the CPU, safetensors memory-maps each file.

    shard=(rank, world): tensor parallelism (pixtral_rt.sharding). The decoder's heads, KV heads and FFN
    width must divide by `world` (checked before anything is read). Each sharded tensor is read as only
    this rank's slice, straight from the file and never whole in host memory: a row block (wq/wk/wv/w1/w3,
    and an FP8 checkpoint's scales of those) is one contiguous byte range; a column block (wo/w2) is one
    range per row. Replicated tensors (embeddings, norms, lm_head, vision, adapter, and the (N, 1) scales of
    an FP8 checkpoint's wo/w2, which are per output channel) are read whole. HF q/k slices hold whole heads
    and are un-permuted with heads / world heads (the permutation stays inside each head). With
    quantization="fp8" on an unquantised checkpoint, each slice is quantised as read: a row block's scales
    are the rows of the unsharded quantisation; a column block's per-channel scale comes from THIS rank's
    columns only, so wo/w2 scales differ between ranks. That is intended: each rank dequantises its own
    partial sum before the all-reduce. (An FP8 checkpoint's wo/w2 keep the checkpoint's one scale per row on
    every rank.)

    stats: if given, stats["bytes_read"] is increased by the tensor-data bytes read from the files."""
    from tqdm import tqdm

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: expected None or one of {', '.join(QUANTIZATIONS)}")
    own = plan.quantization.scheme if plan.quantization is not None else None
    if quantization is not None and own is not None and quantization != own:
        raise ValueError(f"{plan.folder} holds {own} weights already (config.json's quantization_config): "
                         f"quantization={quantization!r} cannot convert them; pass None or {own!r}")
    rank, world = _check_shard(plan, shard, lm_head)
    if world > 1 and quantization == "int4":
        raise ValueError("tensor parallelism (shard=) with int4 weights is not supported yet: load int4 "
                         "unsharded, or shard bf16 / fp8")
    to_fp8 = quantization == "fp8" and own is None        # a quantised checkpoint is quantised already
    to_int4 = quantization == "int4" and own is None
    quantize = to_fp8 or to_int4
    dev = torch.device(device)
    staged = dev.type == "cuda" if staged is None else staged
    wanted = _wanted_keys(plan, keys, quantize)
    # what to read of each tensor, all computed (and checked) before a byte is read
    reads = {k: _slice_ranges(k, plan.sources[k], rank, world, lm_head) for k in wanted}
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        by_file.setdefault(plan.sources[k].file, []).append(k)
    total = sum(n for ranges, _, _ in reads.values() for _, n in ranges)
    out: dict[str, torch.Tensor] = {}
    nread = 0

    def emit(k: str, t: torch.Tensor) -> None:
        out[k] = transform(k, t) if transform is not None else t

    def finish(k: str, t: torch.Tensor) -> None:
        heads = reads[k][2]
        now = quantize and fp8.is_quantized_weight(k)        # quantised here, as it arrives
        if k.endswith(".weight_scale"):
            t = t.float()  # FP8 (N, 1) / int4 (N, K / G) fp32, whatever the file holds
        elif t.dtype not in (fp8.FP8_DTYPE, torch.int32) and not now:
            t = t.to(dtype)  # now: quantised from the file's own values, not from a `dtype` rounding
        if heads:  # rows of a quantised weight (FP8, or int4's packed rows) and of its scale move together
            t = unpermute_from_hf(t, heads).contiguous()
        if now and to_fp8:
            w8, scale = fp8.quantize_weight(t)  # (N, K) e4m3, (N, 1) fp32
            emit(k, w8)
            emit(fp8.scale_key(k), scale)
        elif now:
            packed, scale = int4.quantize_and_pack(t)  # (N, K / 8) int32, (N, K / 128) fp32
            emit(int4.packed_key(k), packed)
            emit(int4.scale_key(k), scale)
        else:
            emit(k, t)

    def read_mapped(path: Path, ks: list[str], bar) -> None:
        """Whole tensors through safetensors (memory-mapped); slices with plain positioned reads."""
        nonlocal nread
        from safetensors import safe_open
        raw_file = None  # opened for the file's first sliced tensor
        try:
            with safe_open(str(path), framework="pt", device="cpu" if dev.type == "cpu" else str(dev)) as f:
                for k in ks:
                    src = plan.sources[k]
                    ranges, shape, _ = reads[k]
                    if ranges == [(src.offset, src.nbytes)]:  # the whole tensor
                        finish(k, f.get_tensor(src.key))
                        n = src.nbytes
                    else:
                        raw_file = raw_file or open(path, "rb", buffering=0)
                        raw = _read_ranges_host(raw_file, path, ranges)
                        n = raw.numel()
                        finish(k, raw.view(_READ_DTYPES[src.dtype]).view(shape).to(dev))
                    nread += n
                    bar.update(n)
        finally:
            if raw_file is not None:
                raw_file.close()

    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        reader = _StagedReader(dev) if staged else None
        try:
            for path, ks in by_file.items():
                try:
                    if not staged:
                        read_mapped(path, ks, bar)
                        continue
                    for k in sorted(ks, key=lambda k: plan.sources[k].offset):
                        ranges, shape, _ = reads[k]
                        before = reader.bytes_read
                        finish(k, reader.read_ranges(path, ranges, _READ_DTYPES[plan.sources[k].dtype], shape))
                        bar.update(reader.bytes_read - before)
                except CheckpointError:
                    raise
                except Exception as exc:  # noqa: BLE001 - safetensors / OS errors on corrupt or vanished data
                    raise CheckpointError(f"{path}: failed while reading tensors "
                                          f"({type(exc).__name__}: {exc})") from exc
        finally:
            if reader is not None:
                reader.close()
                nread += reader.bytes_read
            if stats is not None:
                stats["bytes_read"] = stats.get("bytes_read", 0) + nread
    return out


def _check_shard(plan: CheckpointPlan, shard: tuple[int, int] | None, lm_head: str | None = None) -> tuple[int, int]:
    """(rank, world) of a valid shard argument ((0, 1) for None); the model must divide by world."""
    if shard is None:
        return 0, 1
    try:
        rank, world = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (rank, world), got {shard!r}") from None
    if world > 1 and plan.quantization is not None and plan.quantization.scheme == "int4":
        raise ValueError(f"{plan.folder}: tensor parallelism (shard=) with int4 weights is not supported yet: load "
                         f"this int4 checkpoint unsharded")
    sharding.check_divisible(plan.args, world, lm_head)
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"shard=({rank!r}, {world}): rank must be an integer in [0, {world})")
    return rank, world


def _slice_ranges(key: str, src: TensorSource, rank: int, world: int, lm_head: str | None = None
                  ) -> tuple[list[tuple[int, int]], tuple[int, ...], int]:
    """What to read of one tensor for rank `rank` of `world`: absolute (offset, nbytes) byte ranges (adjacent
    ones merged), the shape they make, and the heads to un-permute HF's rotary rows with (0: none)."""
    rng = sharding.shard_range(key, src.shape, rank, world, lm_head) if world > 1 else None
    if rng is None:
        return [(src.offset, src.nbytes)], src.shape, src.unpermute_heads
    dim, start, stop = rng
    shape = src.shape[:dim] + (stop - start,) + src.shape[dim + 1:]
    inner = src.nbytes // _numel(src.shape[:dim + 1]) if src.nbytes else 0  # bytes of one step along dim
    row = src.shape[dim] * inner  # bytes of one index of the dims before `dim`
    ranges: list[tuple[int, int]] = []
    for r in range(_numel(src.shape[:dim])):
        a, n = src.offset + r * row + start * inner, (stop - start) * inner
        if ranges and ranges[-1][0] + ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
        else:
            ranges.append((a, n))
    # row blocks of q/k are whole heads (head-major rows): un-permute with this rank's heads
    heads = src.unpermute_heads // world if dim == 0 else src.unpermute_heads
    return ranges, shape, heads


def _read_exact(f, path: Path, view: memoryview, offset: int) -> int:
    """Fill `view` with the file's bytes from `offset` (positioned reads: one system call per range, which
    matters for column slices, read one range per row); CheckpointError on a short file."""
    got, n = 0, len(view)
    if not hasattr(os, "preadv"):
        f.seek(offset)
    while got < n:
        r = os.preadv(f.fileno(), [view[got:n]], offset + got) if hasattr(os, "preadv") else f.readinto(view[got:n])
        if not r:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + got}")
        got += r
    return got


def _read_ranges_host(f, path: Path, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Byte ranges of an open file, read straight into one new host uint8 tensor (no other copy)."""
    raw = torch.empty(sum(n for _, n in ranges), dtype=torch.uint8)
    view = memoryview(raw.numpy())
    pos = 0
    for offset, n in ranges:
        pos += _read_exact(f, path, view[pos:pos + n], offset)
    return raw


def _wanted_keys(plan: CheckpointPlan, keys: Iterable[str] | None, quantize: bool) -> list[str]:
    """The sources to read: all, or `keys` plus the weight_scale of each selected quantised weight. An int4
    checkpoint's `...weight` is read as its `...weight_packed`. A scale (or packed) key asked for while
    quantising on the fly is made from its weight, so the weight is read instead."""
    if keys is None:
        return list(plan.sources)
    wanted: dict[str, None] = {}
    for k in keys:
        base = k.rsplit("_", 1)[0] if k.endswith((".weight_scale", ".weight_packed")) else k
        if quantize and base != k and fp8.is_quantized_weight(base):
            k = base
        if k not in plan.sources and int4.packed_key(k) in plan.sources:
            k, base = int4.packed_key(k), k
        if k not in plan.sources:
            raise KeyError(f"{k!r} is not a tensor of the checkpoint in {plan.folder}")
        wanted[k] = None
        if fp8.scale_key(base) in plan.sources:
            wanted[fp8.scale_key(base)] = None
    return list(wanted)


class _StagedReader:
    """File bytes -> device tensors through two pinned host buffers (double-buffered, async copies).
    `read_ranges` packs several byte ranges (a column slice: one per row) into the buffers, so a slice
    costs one device copy per buffer's worth of bytes, however many rows it has."""

    def __init__(self, device: torch.device, chunk: int = 128 << 20):
        self.device, self.chunk = device, chunk
        pin = device.type == "cuda"
        self.bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        self.events: list = [None, None]
        self.i = 0
        self.bytes_read = 0  # tensor-data bytes read from files
        self._file, self._path = None, None

    def read(self, path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        return self.read_ranges(path, [(offset, nbytes)], dtype, shape)

    def read_ranges(self, path: Path, ranges: list[tuple[int, int]], dtype: torch.dtype, shape) -> torch.Tensor:
        """The concatenated bytes of `ranges` (absolute offsets in `path`) as a device tensor of `shape`."""
        if self._path != path:
            if self._file is not None:
                self._file.close()
            self._file, self._path = open(path, "rb", buffering=0), path
        raw = torch.empty(sum(n for _, n in ranges), dtype=torch.uint8, device=self.device)
        pos = fill = 0  # bytes of `raw` already sent; bytes in the current buffer
        j = self.i % 2
        for offset, nbytes in ranges:
            done = 0
            while done < nbytes:
                if fill == 0:
                    j = self.i % 2
                    if self.events[j] is not None:
                        self.events[j].synchronize()  # the copy out of this buffer has finished
                m = min(nbytes - done, self.chunk - fill)
                self.bytes_read += _read_exact(self._file, path, self.views[j][fill:fill + m], offset + done)
                fill += m
                done += m
                if fill == self.chunk:
                    pos = self._send(raw, pos, j, fill)
                    fill = 0
        if fill:
            self._send(raw, pos, j, fill)
        return raw.view(dtype).view(shape)

    def _send(self, raw: torch.Tensor, pos: int, j: int, n: int) -> int:
        raw[pos:pos + n].copy_(self.bufs[j][:n], non_blocking=True)
        if self.device.type == "cuda":
            self.events[j] = torch.cuda.Event()
            self.events[j].record()
        self.i += 1
        return pos + n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._path = None, None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def load_reference_model(folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                         fmt: str | None = None, progress: bool = False, quantization: str | None = None):
    """Plan, validate, and load a checkpoint into the reference PixtralModel (built on meta, weights assigned).
    FP8 decoder linears (an FP8 checkpoint, or quantization="fp8") become reference Fp8Linear modules, int4
    ones (an int4 checkpoint, or quantization="int4") Int4Linear modules."""
    from .reference.model import PixtralModel
    plan = plan_checkpoint(folder, fmt)
    sd = load_state_dict(plan, device=device, dtype=dtype, progress=progress, quantization=quantization)
    return PixtralModel.from_state_dict(plan.args, sd), plan
