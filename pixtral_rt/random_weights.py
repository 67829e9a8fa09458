"""Seeded random weights of the real architecture, written as a real checkpoint in either format.

Each tensor is drawn from its own generator seeded by (seed, tensor name), so the Mistral and HF copies of
one seed hold the same model (HF's copy with q/k rows permuted as HF's conversion does). Matrices are
N(0, std), norm weights 1 + N(0, std), biases N(0, std). Tests, benchmarks and the embedded default all
load these through the real loader.

FP8 (`quantization="fp8"`, HF format only): the text decoder's linears are written in the compressed-tensors
layout of pixtral-12b-FP8-dynamic, F8_E4M3 [out, in] + float32 `weight_scale` [out, 1], quantised with
pixtral_rt.fp8.quantize_weight from the same seeded tensors: the FP8 checkpoint of a seed is the bf16
checkpoint of that seed quantised. `random_state_dict_on_device` makes the same model straight on a GPU,
without a checkpoint (the `--random-weights` benchmark aid).

Int4 (`quantization="int4"`, HF format only): the decoder linears in the compressed-tensors "pack-quantized"
W4A16 layout, `weight_packed` I32 [out, in / 8] + BF16 `weight_scale` [out, in / 128] + I64 `weight_shape`
[2], quantised with pixtral_rt.int4.quantize_and_pack (round to nearest, group 128) from the same seeded
tensors (the scales are bf16 values by construction, so BF16 holds them exactly): the int4 checkpoint of a
seed is the bf16 checkpoint of that seed quantised, as `quantization="int4"` at load would.

Random numbers depend on the device that draws them (a CUDA generator is not the CPU one): a checkpoint
written with device="cuda" equals random_state_dict_on_device(device="cuda"), not the CPU-drawn one.

    python -m pixtral_rt.random_weights OUT_DIR --preset Pixtral-12B-2409 --format mistral
    python -m pixtral_rt.random_weights OUT_DIR --preset Pixtral-12B-2409 --format hf --quantization fp8
    python -m pixtral_rt.random_weights OUT_DIR --preset Pixtral-12B-2409 --format hf --quantization int4
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch

from . import fp8
from . import int4
from .checkpoint import expected_shapes, mistral_to_hf_key, permute_for_hf, rotary_heads
from .config import PRESETS, PixtralArgs, preset
from .quantization_config import QuantizationConfig

QUANTIZATIONS = ("fp8", "int4")


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float = 0.02, device="cpu",
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
    if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
        t += 1.0
    return t.to(dtype)


def random_state_dict(args: PixtralArgs, seed: int = 0, std: float = 0.02, device="cpu",
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The whole model in memory (our key names). For large models prefer write_random_checkpoint."""
    return {k: random_tensor(k, s, seed, std, device, dtype) for k, s in expected_shapes(args).items()}


def _check_quantization(quantization: str | None, fmt: str | None = None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: expected None or one of {', '.join(QUANTIZATIONS)}")
    if quantization == "fp8" and fmt == "mistral":
        raise ValueError("FP8 checkpoints are written in the HF compressed-tensors layout (the one of "
                         "pixtral-12b-FP8-dynamic): use fmt='hf' (--format hf)")
    if quantization == "int4" and fmt == "mistral":
        raise ValueError("int4 checkpoints are written in the HF compressed-tensors pack-quantized layout "
                         "(W4A16, as llm-compressor writes it): use fmt='hf' (--format hf)")


def _quantized(k: str, t: torch.Tensor, quantization: str | None) -> dict[str, torch.Tensor]:
    """One drawn tensor as the loader's contract holds it: {k: t}, or a decoder linear quantised: FP8
    {weight: (N, K) e4m3, weight_scale: (N, 1) fp32}, int4 {weight_packed: (N, K / 8) int32, weight_scale:
    (N, K / 128) fp32}."""
    if quantization == "fp8" and fp8.is_quantized_weight(k):
        w8, scale = fp8.quantize_weight(t)
        return {k: w8, fp8.scale_key(k): scale}
    if quantization == "int4" and int4.is_quantized_weight(k):
        packed, scale = int4.quantize_and_pack(t)
        return {int4.packed_key(k): packed, int4.scale_key(k): scale}
    return {k: t}


def _random_entries(k: str, shape: tuple[int, ...], seed: int, std: float, device, dtype: torch.dtype,
                    quantization: str | None) -> dict[str, torch.Tensor]:
    """One model tensor (our key), or a quantised decoder linear (_quantized), quantised from the tensor as
    drawn in `dtype` (the checkpoint's dtype)."""
    return _quantized(k, random_tensor(k, shape, seed, std, device, dtype), quantization)


def _nbytes(k: str, shape: tuple[int, ...], esize: int, quantization: str | None) -> int:
    n = 1
    for d in shape:
        n *= d
    if quantization == "fp8" and fp8.is_quantized_weight(k):
        return n + shape[0] * 4  # e4m3 bytes + fp32 scales
    if quantization == "int4" and int4.is_quantized_weight(k):
        return n // 2 + n // int4.GROUP_SIZE * 4  # packed nibbles + fp32 scales (bf16 in a written file)
    return n * esize


def write_random_checkpoint(folder: str | Path, args: PixtralArgs, fmt: str = "mistral", seed: int = 0,
                            std: float = 0.02, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 << 30,
                            legacy_hf_keys: bool = False, device="cpu", progress: bool = False,
                            quantization: str | None = None) -> Path:
    """Write params.json/config.json + safetensors shards (+ index) + tekken.json into `folder`.
    Files are written under temporary names and renamed at the end: a crash leaves no half checkpoint.
    quantization="fp8" (fmt="hf" only): decoder linears as FP8 + weight_scale, config.json with the
    compressed-tensors quantization_config whose ignore list names lm_head, projector and vision tower.
    quantization="int4" (fmt="hf" only): decoder linears as weight_packed + BF16 weight_scale + weight_shape,
    config.json with the pack-quantized W4A16 quantization_config (same ignore list)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    _check_quantization(quantization, fmt)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(args)
    esize = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[str]] = [[]]  # our keys; an FP8 weight and its scale share a shard
    size = 0
    for k, s in shapes.items():
        nbytes = _nbytes(k, s, esize, quantization)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    n = len(shards)
    stem = "consolidated" if fmt == "mistral" else "model"
    names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    written = []
    for keys, name in tqdm(list(zip(shards, names)), desc="writing shards", disable=not progress, file=sys.stderr):
        tensors = {}
        for k in keys:
            heads = rotary_heads(k, args) if fmt == "hf" else 0
            entries = _random_entries(k, shapes[k], seed, std, device, dtype, quantization)
            if int4.packed_key(k) in entries:     # as compressed-tensors writes it: bf16 scales, an int64 shape
                entries[int4.scale_key(k)] = entries[int4.scale_key(k)].to(int4.SCALE_DTYPE)  # exact
                entries[int4.shape_key(k)] = torch.tensor(shapes[k], dtype=torch.int64)
            for key, t in entries.items():
                if fmt == "hf":
                    if heads and t.dim() == 2:  # q/k rows, and the scales of each row with it (per row)
                        t = permute_for_hf(t, heads)
                    key = mistral_to_hf_key(key, legacy=legacy_hf_keys)
                tensors[key] = t.contiguous().cpu()
                weight_map[key] = name
        tmp = folder / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        written.append((tmp, folder / name))
        del tensors
    for tmp, final in written:
        tmp.replace(final)
    if n > 1:
        idx = {"metadata": {"total_size": sum(f.stat().st_size for _, f in written)}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(idx, indent=1))
    if fmt == "mistral":
        (folder / "params.json").write_text(json.dumps(args.to_params_json(), indent=1))
    else:
        cfg = args.to_hf_config()
        if quantization is not None:
            cfg["quantization_config"] = QuantizationConfig.pixtral(legacy_hf_keys, quantization).to_hf()
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    _copy_tokenizer(folder, args)
    return folder


def random_state_dict_on_device(args: PixtralArgs, seed: int = 0, std: float = 0.02, device="cuda",
                                dtype: torch.dtype = torch.bfloat16, quantization: str | None = None,
                                progress: bool = True, weights_dtype: torch.dtype = torch.bfloat16,
                                shard: tuple[int, int] | None = None, keys=None,
                                lm_head: str | None = None) -> dict[str, torch.Tensor]:
    """Exactly what load_state_dict(plan, device, dtype) returns for write_random_checkpoint(seed, std,
    dtype=weights_dtype, device=device, quantization=...), made on `device` without a checkpoint: same keys,
    dtypes and shapes, our un-permuted layout, FP8 decoder linears (float8_e4m3fn + fp32 (N, 1) scale) when
    quantization="fp8", int4 ones (int32 (N, K / 8) weight_packed + fp32 (N, K / 128) weight_scale) when
    quantization="int4". Tensors are drawn one at a time in `weights_dtype` (the checkpoint's rounding) and
    each decoder linear is quantised as it is made, so only the final model is ever held (Pixtral-Large, 123 B
    params, fits one GPU only quantised). int4 is not sharded (shard= with int4 is refused).
    shard=(rank, world): this rank's slice of each tensor (pixtral_rt/sharding.py), cut right after the tensor
    is drawn (before FP8 quantisation, like the sharded loader: a row-parallel slice gets its own per-channel
    scales), so a rank holds only its shard; keys: only these tensors (e.g. the text decoder's)."""
    from tqdm import tqdm

    from .sharding import shard_tensor

    _check_quantization(quantization)
    if quantization == "int4" and shard is not None and shard[1] > 1:
        raise ValueError("tensor parallelism (shard=) with int4 weights is not supported yet")
    shapes = expected_shapes(args)
    if keys is not None:
        keys = set(keys)
        shapes = {k: s for k, s in shapes.items() if k in keys}
    out: dict[str, torch.Tensor] = {}
    esize = torch.tensor([], dtype=weights_dtype).element_size()
    total = sum(_nbytes(k, s, esize, quantization) for k, s in shapes.items())
    with tqdm(total=total, unit="B", unit_scale=True, desc="random weights", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for k, s in shapes.items():
            if shard is None:
                entries = _random_entries(k, s, seed, std, device, weights_dtype, quantization)
            else:
                t = shard_tensor(random_tensor(k, s, seed, std, device, weights_dtype), k, *shard, lm_head=lm_head)
                entries = _quantized(k, t, quantization)
                del t
            for key, t in entries.items():
                # the loader's casts: FP8 stays e4m3, int4 stays packed int32, scales fp32, everything else `dtype`
                out[key] = (t if key.endswith(".weight_scale") or t.dtype in (fp8.FP8_DTYPE, torch.int32)
                            else t.to(dtype))
            bar.update(_nbytes(k, s, esize, quantization))
    return out


def _copy_tokenizer(folder: Path, args: PixtralArgs) -> None:
    """Pixtral-12B's tekken tokenizer ships in mistral_common; put it where a real checkpoint has it."""
    if args.text.vocab_size != 131072:
        return
    try:
        import mistral_common
    except ImportError:
        return
    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if src.is_file():
        shutil.copyfile(src, folder / "tekken.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixtral_rt.random_weights",
                                description="Write a seeded random-weight checkpoint of a Pixtral-family model.")
    p.add_argument("folder", help="output folder (created)")
    p.add_argument("--preset", default="tiny", help=f"one of: tiny, tiny-mistral3, {', '.join(PRESETS)}")
    p.add_argument("--format", choices=["mistral", "hf"], default="mistral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cpu", help="where to draw the numbers (cuda is much faster)")
    p.add_argument("--quantization", choices=list(QUANTIZATIONS), default=None,
                   help="fp8: write the text decoder's linears as FP8 e4m3 with one fp32 scale per output channel, "
                        "in the HF compressed-tensors layout of pixtral-12b-FP8-dynamic; int4: as 4-bit integers "
                        "(round to nearest, symmetric, one bf16 scale per 128 inputs) in the compressed-tensors "
                        "pack-quantized W4A16 layout (weight_packed / weight_scale / weight_shape). Both need "
                        "--format hf; embeddings, lm_head, vision tower and adapter stay in --dtype. Same model as "
                        "the unquantised checkpoint of the same seed, quantised")
    a = p.parse_args(argv)
    try:
        args = preset(a.preset)
    except ValueError as exc:
        p.error(str(exc))
    try:
        _check_quantization(a.quantization, a.format)
    except ValueError as exc:
        p.error(str(exc))
    write_random_checkpoint(a.folder, args, a.format, a.seed, dtype=getattr(torch, a.dtype), device=a.device,
                            progress=True, quantization=a.quantization)
    q = f" {a.quantization.upper()}" if a.quantization else ""
    print(f"wrote {a.format}-format{q} {args.name} random weights (seed {a.seed}) to {a.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
