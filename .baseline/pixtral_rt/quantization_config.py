"""The `quantization_config` block of an HF checkpoint's config.json, for the one scheme this runtime reads.

Supported: the FP8-dynamic scheme of `pixtral-12b-FP8-dynamic` (Neural Magic / llm-compressor), written by
the compressed-tensors library as
    quant_method "compressed-tensors", format "float-quantized", quantization_status "compressed",
    one config group targeting ["Linear"]:
        weights            num_bits 8, type float, symmetric, strategy "channel", dynamic false
                           -> `<module>.weight` F8_E4M3 [out, in] + `<module>.weight_scale` [out, 1]
        input_activations  num_bits 8, type float, symmetric, strategy "token", dynamic true
                           -> no tensor in the file: the scale of each token is computed at run time
        output_activations null
    kv_cache_scheme null, and an `ignore` list of modules left unquantised.
The numerics are pixtral_rt.fp8's. Everything else (int8 / int4 / packed weights, block / group / tensor
weight scales, static activation scales, weight-only FP8, asymmetric, quantised KV cache, sparsity,
rotations) is rejected with a ConfigError naming the file, the field and its value.

Field names and defaults follow compressed-tensors 0.20 (quantization/quant_config.py, quant_args.py,
quant_scheme.py): an omitted `strategy` is inferred from `group_size` (None -> "tensor", -1 -> "channel",
> 0 -> "group"); `type` and `strategy` are compared case-insensitively; a config group may also be a list
of targets under a preset name ({"FP8_DYNAMIC": ["Linear"]}).

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

SUPPORTED = ("supported is only the FP8-dynamic scheme of pixtral-12b-FP8-dynamic: quant_method "
             "'compressed-tensors', format 'float-quantized', FP8 (e4m3) weights with one scale per output "
             "channel (strategy 'channel'), FP8 activations quantised per token at run time (strategy 'token', "
             "dynamic true); or load the bf16 checkpoint with quantization='fp8' to quantise while loading")

# compressed-tensors' FP8_DYNAMIC preset (quant_scheme.py), as config.json spells it
_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
            "dynamic": False}
_INPUTS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
           "dynamic": True}


@dataclass(frozen=True)
class QuantizationConfig:
    """FP8-dynamic (compressed-tensors float-quantized) settings of a checkpoint. `ignore`: HF module names
    (or `re:` regexes) of the Linear layers kept unquantised."""
    ignore: tuple[str, ...] = ()

    scheme = "fp8"  # the name load_state_dict(quantization=...) and the CLI use for it

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
        if fmt != "float-quantized":
            chk.fail("format", fmt, _FORMAT_HINTS.get(fmt, "unsupported compressed-tensors storage format"))
        status = d.get("quantization_status")
        if status != "compressed":
            chk.fail("quantization_status", status, "the weights are not stored compressed (FP8) in this file")
        for name in ("sparsity_config", "transform_config"):
            _check_empty(chk, name, d.get(name))
        if d.get("kv_cache_scheme") is not None:
            chk.fail("kv_cache_scheme", d["kv_cache_scheme"], "a quantised KV cache is not supported (must be null)")
        if d.get("moe_sparsity_config") is not None:
            chk.fail("moe_sparsity_config", d["moe_sparsity_config"], "expert sparsity is not supported")
        _check_groups(chk, d.get("config_groups"))
        ignore = d.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            chk.fail("ignore", ignore, "expected a list of module names or 're:' regexes")
        for x in ignore:
            if x.startswith("re:"):
                try:
                    re.compile(x[3:])
                except re.error as exc:
                    chk.fail("ignore", x, f"not a valid regular expression ({exc})")
        return cls(ignore=tuple(ignore))

    # ------------------------------------------------------------------ writing
    def to_hf(self) -> dict[str, Any]:
        """config.json's `quantization_config` for this scheme, as compressed-tensors writes it."""
        return {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(_WEIGHTS),
                                          "input_activations": dict(_INPUTS), "output_activations": None}},
            "ignore": list(self.ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {},
        }

    @classmethod
    def pixtral(cls, legacy_hf_keys: bool = False) -> "QuantizationConfig":
        """What pixtral-12b-FP8-dynamic leaves unquantised: lm_head, the projector and the vision tower, named
        in the HF key layout being written (legacy `language_model.*` / `vision_tower.*`, or the newer
        `model.*` + `lm_head`). The embedding table is not a Linear, so it needs no entry."""
        if legacy_hf_keys:
            return cls(("language_model.lm_head", "re:multi_modal_projector.*", "re:vision_tower.*"))
        return cls(("lm_head", "re:model.multi_modal_projector.*", "re:model.vision_tower.*"))

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
    "int-quantized": "int8 weights are not supported", "pack-quantized": "packed int4/int8 weights are not supported",
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


def _check_groups(chk: _Checker, groups) -> None:
    if not isinstance(groups, dict) or len(groups) != 1:
        names = list(groups) if isinstance(groups, dict) else groups  # the names say enough
        chk.fail("config_groups", names, f"expected exactly one config group, found "
                                         f"{len(groups) if isinstance(groups, dict) else 0}")
    (name, scheme), = groups.items()
    field = f"config_groups.{name}"
    if isinstance(scheme, list):  # {"FP8_DYNAMIC": ["Linear"]}: a preset name with its targets
        if name.upper() != "FP8_DYNAMIC":
            chk.fail(field, scheme, f"preset {name!r} is not supported (only FP8_DYNAMIC)")
        scheme = {"targets": scheme, "weights": dict(_WEIGHTS), "input_activations": dict(_INPUTS)}
    if not isinstance(scheme, dict):
        chk.fail(field, scheme, "expected an object")
    if scheme.get("targets") != ["Linear"]:
        chk.fail(f"{field}.targets", scheme.get("targets"), "only ['Linear'] is supported")
    if scheme.get("format") not in (None, "float-quantized"):
        chk.fail(f"{field}.format", scheme["format"], "only 'float-quantized' is supported")
    if scheme.get("output_activations") is not None:
        chk.fail(f"{field}.output_activations", scheme["output_activations"],
                 "quantised outputs are not supported (must be null)")
    _check_weights(chk, f"{field}.weights", scheme.get("weights"))
    _check_inputs(chk, f"{field}.input_activations", scheme.get("input_activations"))


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
