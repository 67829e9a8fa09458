"""The `quantization_config` block of an HF checkpoint's config.json, for the two schemes this runtime reads.

Supported, both written by the compressed-tensors library with quant_method "compressed-tensors",
quantization_status "compressed", one config group targeting ["Linear"], kv_cache_scheme null and an
`ignore` list of modules left unquantised:

  scheme "fp8": the FP8-dynamic scheme of `pixtral-12b-FP8-dynamic` (Neural Magic / llm-compressor),
    format "float-quantized":
        weights            num_bits 8, type float, symmetric, strategy "channel", dynamic false
                           -> `<module>.weight` F8_E4M3 [out, in] + `<module>.weight_scale` [out, 1]
        input_activations  num_bits 8, type float, symmetric, strategy "token", dynamic true
                           -> no tensor in the file: the scale of each token is computed at run time
        output_activations null
    The numerics are pixtral_rt.fp8's.
  scheme "int4": W4A16 (the preset llm-compressor writes for GPTQ and round-to-nearest), format
    "pack-quantized":
        weights            num_bits 4, type int, symmetric, strategy "group", group_size 128 (any power of
                           two >= 16 is read), dynamic false, actorder null or "weight" (a calibration-only
                           ordering: the stored format is unchanged)
                           -> `<module>.weight_packed` I32 [out, in / 8] + `<module>.weight_scale`
                              [out, in / group] + `<module>.weight_shape` [2]
        input_activations  null (activations stay bf16), output_activations null
    The numerics (packing order, RTN) are pixtral_rt.int4's.
Everything else (int8, asymmetric int4 with zero points, actorder "group" with g_idx, W4A8, block / tensor
weight scales, static activation scales, weight-only FP8, quantised KV cache, sparsity, rotations) is
rejected with a ConfigError naming the file, the field and its value.

Field names and defaults follow compressed-tensors 0.20 (quantization/quant_config.py, quant_args.py,
quant_scheme.py): an omitted `strategy` is inferred from `group_size` (None -> "tensor", -1 -> "channel",
> 0 -> "group"); `type` and `strategy` are compared case-insensitively; a config group may also be a list
of targets under a preset name ({"FP8_DYNAMIC": ["Linear"]}, {"W4A16": ["Linear"]}).

Ignore matching (compressed-tensors utils/match.py `match_name`): an entry matches a MODULE name (no
`.weight` suffix), either exactly, or, with a `re:` prefix, by `re.match` (anchored at the start only, not
at the end) of the rest of the entry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError

SUPPORTED = ("supported are two compressed-tensors schemes (quant_method 'compressed-tensors'): the FP8-dynamic "
             "scheme of pixtral-12b-FP8-dynamic (format 'float-quantized': FP8 e4m3 weights with one scale per "
             "output channel, strategy 'channel', FP8 activations quantised per token at run time, strategy "
             "'token', dynamic true) and W4A16 (format 'pack-quantized': symmetric int4 weights with one scale "
             "per group of 128 inputs, strategy 'group', unquantised activations); or load the bf16 checkpoint "
             "with quantization='fp8' or 'int4' to quantise while loading")

# compressed-tensors' FP8_DYNAMIC preset (quant_scheme.py), as config.json spells it
_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
            "dynamic": False}
_INPUTS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
           "dynamic": True}
# compressed-tensors' W4A16 preset (quant_scheme.py _int_wnam(4)), as config.json spells it
_INT4_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group",
                 "dynamic": False, "actorder": None}
_FORMATS = {"float-quantized": "fp8", "pack-quantized": "int4"}   # format -> scheme


@dataclass(frozen=True)
class QuantizationConfig:
    """The compressed-tensors settings of a checkpoint. `ignore`: HF module names (or `re:` regexes) of the
    Linear layers kept unquantised. `scheme`: "fp8" (float-quantized FP8-dynamic) or "int4" (pack-quantized
    W4A16), the name load_state_dict(quantization=...) and the CLI use for it. `group_size`: inputs per
    weight scale (int4 only)."""
    ignore: tuple[str, ...] = ()
    scheme: str = "fp8"
    group_size: int | None = None

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_hf(cls, d: dict, path: str | Path) -> "QuantizationConfig":
        """Validate config.json's `quantization_config` (the dict `d`); `path` names the file in errors."""
        chk = _Checker(Path(path))
        if not isinstance(d, dict):
            chk.fail("", d, "expected an object")
        method = d.get("quant_method")
        if method != "compressed-tensors":
            chk.fail("quant_method", method, _METHOD_HINTS.get(str(method).lower(), "unsupported quantisation method"))
        fmt = d.get("format")
        if fmt not in _FORMATS:
            chk.fail("format", fmt, _FORMAT_HINTS.get(fmt, "unsupported compressed-tensors storage format"))
        scheme = _FORMATS[fmt]
        status = d.get("quantization_status")
        if status != "compressed":
            chk.fail("quantization_status", status, f"the weights are not stored compressed ({fmt}) in this file")
        for name in ("sparsity_config", "transform_config"):
            _check_empty(chk, name, d.get(name))
        if d.get("kv_cache_scheme") is not None:
            chk.fail("kv_cache_scheme", d["kv_cache_scheme"], "a quantised KV cache is not supported (must be null)")
        if d.get("moe_sparsity_config") is not None:
            chk.fail("moe_sparsity_config", d["moe_sparsity_config"], "expert sparsity is not supported")
        group_size = _check_groups(chk, d.get("config_groups"), scheme)
        ignore = d.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            chk.fail("ignore", ignore, "expected a list of module names or 're:' regexes")
        for x in ignore:
            if x.startswith("re:"):
                try:
                    re.compile(x[3:])
                except re.error as exc:
                    chk.fail("ignore", x, f"not a valid regular expression ({exc})")
        return cls(ignore=tuple(ignore), scheme=scheme, group_size=group_size)

    # ------------------------------------------------------------------ writing
    def to_hf(self) -> dict[str, Any]:
        """config.json's `quantization_config` for this scheme, as compressed-tensors writes it."""
        if self.scheme == "int4":
            fmt = "pack-quantized"
            group = {"targets": ["Linear"], "weights": dict(_INT4_WEIGHTS, group_size=self.group_size),
                     "input_activations": None, "output_activations": None}
        else:
            fmt = "float-quantized"
            group = {"targets": ["Linear"], "weights": dict(_WEIGHTS), "input_activations": dict(_INPUTS),
                     "output_activations": None}
        return {
            "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(self.ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {},
        }

    @classmethod
    def pixtral(cls, legacy_hf_keys: bool = False, scheme: str = "fp8",
                group_size: int = 128) -> "QuantizationConfig":
        """What pixtral-12b-FP8-dynamic leaves unquantised (and the int4 writer too): lm_head, the projector
        and the vision tower, named in the HF key layout being written (legacy `language_model.*` /
        `vision_tower.*`, or the newer `model.*` + `lm_head`). The embedding table is not a Linear, so it needs
        no entry. scheme "int4": W4A16 with `group_size` inputs per scale."""
        if scheme not in _FORMATS.values():
            raise ValueError(f"unknown quantisation scheme {scheme!r}: expected one of {', '.join(_FORMATS.values())}")
        if legacy_hf_keys:
            ignore = ("language_model.lm_head", "re:multi_modal_projector.*", "re:vision_tower.*")
        else:
            ignore = ("lm_head", "re:model.multi_modal_projector.*", "re:model.vision_tower.*")
        return cls(ignore, scheme, group_size if scheme == "int4" else None)

    # ------------------------------------------------------------------ matching
    def ignores(self, hf_module_name: str) -> bool:
        """True if the ignore list leaves this module (e.g. `language_model.lm_head`, no `.weight`) unquantised."""
        return any(_match_name(hf_module_name, target) for target in self.ignore)


def _match_name(name: str, target: str) -> bool:
    """compressed-tensors' match_name: 're:' -> re.match of the regex on the name, else exact equality."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


# ---------------------------------------------------------------------------------------- validation
_METHOD_HINTS = {
    "fp8": "vLLM/HF 'fp8' checkpoints (per-tensor or block-wise scales, weight_scale_inv) are not supported",
    "gptq": "GPTQ integer weights are not supported", "awq": "AWQ integer weights are not supported",
    "bitsandbytes": "bitsandbytes weights are not supported", "none": "the field is missing",
}
_FORMAT_HINTS = {
    "int-quantized": "int8 weights are not supported",
    "naive-quantized": "naive-quantized (int) weights are not supported",
    "nvfp4-pack-quantized": "NVFP4 weights are not supported", "mixed-precision": "several formats are not supported",
    "dense": "a dense (unquantised) compressed-tensors checkpoint: load it without quantization_config",
    None: "the field is missing",
}


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, value, why: str):
        where = "quantization_config" + (f".{field}" if field else "")
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
        raise ConfigError(f"{self.path}: {where} is {shown}: {why}; {SUPPORTED}")


def _check_empty(chk: _Checker, name: str, value) -> None:
    """sparsity_config / transform_config: absent, null, {} or a dense sparsity config."""
    if not value or (name == "sparsity_config" and isinstance(value, dict) and value.get("format") == "dense"):
        return
    why = ("sparse weights are not supported" if name == "sparsity_config"
           else "rotated (transformed) weights are not supported")
    chk.fail(name, value, why)


def _check_groups(chk: _Checker, groups, scheme: str) -> int | None:
    """The one config group of `scheme` ("fp8" or "int4"); returns the int4 group size (None for FP8)."""
    if not isinstance(groups, dict) or len(groups) != 1:
        names = list(groups) if isinstance(groups, dict) else groups  # the names say enough
        chk.fail("config_groups", names, f"expected exactly one config group, found "
                                         f"{len(groups) if isinstance(groups, dict) else 0}")
    (name, group), = groups.items()
    field = f"config_groups.{name}"
    fmt = "pack-quantized" if scheme == "int4" else "float-quantized"
    if isinstance(group, list):  # {"FP8_DYNAMIC": ["Linear"]}: a preset name with its targets
        preset = "W4A16" if scheme == "int4" else "FP8_DYNAMIC"
        if name.upper() != preset:
            chk.fail(field, group, f"preset {name!r} is not supported with format {fmt!r} (only {preset})")
        group = ({"targets": group, "weights": dict(_INT4_WEIGHTS), "input_activations": None} if scheme == "int4"
                 else {"targets": group, "weights": dict(_WEIGHTS), "input_activations": dict(_INPUTS)})
    if not isinstance(group, dict):
        chk.fail(field, group, "expected an object")
    if group.get("targets") != ["Linear"]:
        chk.fail(f"{field}.targets", group.get("targets"), "only ['Linear'] is supported")
    if group.get("format") not in (None, fmt):
        chk.fail(f"{field}.format", group["format"], f"only {fmt!r} is supported (the checkpoint's format)")
    if group.get("output_activations") is not None:
        chk.fail(f"{field}.output_activations", group["output_activations"],
                 "quantised outputs are not supported (must be null)")
    if scheme == "int4":
        group_size = _check_int4_weights(chk, f"{field}.weights", group.get("weights"))
        if group.get("input_activations") is not None:
            chk.fail(f"{field}.input_activations", group["input_activations"],
                     "int4 weights run with unquantised activations here (W4A16); W4A8 / W4A4 are not supported "
                     "(must be null)")
        return group_size
    _check_weights(chk, f"{field}.weights", group.get("weights"))
    _check_inputs(chk, f"{field}.input_activations", group.get("input_activations"))
    return None


def _strategy(args: dict) -> str:
    """compressed-tensors' inference of an omitted strategy from group_size."""
    s = args.get("strategy")
    if s is not None:
        return str(s).lower()
    g = args.get("group_size")
    return "tensor" if g is None else "channel" if g == -1 else "group"


def _check_float8(chk: _Checker, field: str, args) -> None:
    if not isinstance(args, dict):
        chk.fail(field, args, "expected an object")
    typ = str(args.get("type", "int")).lower()  # compressed-tensors' default type is int
    if typ != "float":
        chk.fail(f"{field}.type", args.get("type"), "integer quantisation is not supported")
    if args.get("num_bits", 8) != 8:
        chk.fail(f"{field}.num_bits", args.get("num_bits"), "only 8-bit (FP8 e4m3) is supported")
    if args.get("symmetric", True) is not True:
        chk.fail(f"{field}.symmetric", args.get("symmetric"), "asymmetric quantisation (zero points) is not supported")


_WEIGHT_STRATEGY_HINTS = {
    "block": "block-wise weight scales are not supported", "group": "group-wise weight scales are not supported",
    "tensor": "per-tensor weight scales are not supported",
    "tensor_group": "tensor-group (NVFP4) scales are not supported",
}


def _check_weights(chk: _Checker, field: str, args) -> None:
    if args is None:
        chk.fail(field, None, "activation-only quantisation is not supported (weights must be FP8)")
    _check_float8(chk, field, args)
    strategy = _strategy(args)
    if strategy != "channel":
        chk.fail(f"{field}.strategy", args.get("strategy", strategy),
                 _WEIGHT_STRATEGY_HINTS.get(strategy, "only one scale per output channel ('channel') is supported"))
    if args.get("block_structure") is not None:
        chk.fail(f"{field}.block_structure", args["block_structure"], "block-wise weight scales are not supported")
    if args.get("dynamic", False) is not False:
        chk.fail(f"{field}.dynamic", args.get("dynamic"), "weights must carry static scales in the file")


def _check_inputs(chk: _Checker, field: str, args) -> None:
    if args is None:
        chk.fail(field, None, "weight-only FP8 (no input_activations) is not supported: this runtime's FP8 "
                              "prefill quantises activations per token")
    _check_float8(chk, field, args)
    if args.get("dynamic", False) is not True:
        chk.fail(f"{field}.dynamic", args.get("dynamic"), "static activation scales (input_scale tensors) "
                                                           "are not supported: activations are quantised at run time")
    strategy = _strategy(args)
    if strategy != "token":
        chk.fail(f"{field}.strategy", args.get("strategy", strategy),
                 "only per-token activation scales ('token') are supported")


_INT4_STRATEGY_HINTS = {
    "channel": "one scale per output channel is not supported with int4 (only 'group')",
    "tensor": "per-tensor weight scales are not supported", "block": "block-wise weight scales are not supported",
    "tensor_group": "tensor-group scales are not supported",
}


def _check_int4_weights(chk: _Checker, field: str, args) -> int:
    """W4A16 weights: int, 4 bits, symmetric, group-wise, static; returns the group size."""
    if not isinstance(args, dict):
        chk.fail(field, args, "expected an object (the int4 weight settings)")
    typ = str(args.get("type", "int")).lower()
    if typ != "int":
        chk.fail(f"{field}.type", args.get("type"), "format 'pack-quantized' holds integer weights (type 'int')")
    if args.get("num_bits", 8) != 4:
        chk.fail(f"{field}.num_bits", args.get("num_bits", 8), "only 4-bit integer weights are supported "
                                                               "(int8 and other widths are not)")
    if args.get("symmetric", True) is not True:
        chk.fail(f"{field}.symmetric", args.get("symmetric"), "asymmetric int4 (weight_zero_point tensors) is "
                                                              "not supported")
    strategy = _strategy(args)
    if strategy != "group":
        chk.fail(f"{field}.strategy", args.get("strategy", strategy),
                 _INT4_STRATEGY_HINTS.get(strategy, "only group-wise scales ('group') are supported"))
    g = args.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g < 16 or g & (g - 1):
        chk.fail(f"{field}.group_size", g, "expected a power of two >= 16 (128 as published)")
    actorder = args.get("actorder")
    if actorder not in (None, False) and str(actorder).lower() not in ("weight", "static"):
        chk.fail(f"{field}.actorder", actorder, "activation reordering with a group index (weight_g_idx) is not "
                                                "supported; null or 'weight' (calibration-only) are")
    if args.get("block_structure") is not None:
        chk.fail(f"{field}.block_structure", args["block_structure"], "block-wise weight scales are not supported")
    if args.get("dynamic", False) is not False:
        chk.fail(f"{field}.dynamic", args.get("dynamic"), "weights must carry static scales in the file")
    if args.get("scale_dtype") is not None:
        chk.fail(f"{field}.scale_dtype", args["scale_dtype"], "only scales stored in the checkpoint's own float "
                                                              "dtype (scale_dtype null) are supported")
    return g
