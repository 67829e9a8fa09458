"""Seeded random weights of the real architecture, written as a real checkpoint in either format.

Each tensor is drawn from its own generator seeded by (seed, tensor name), so the Mistral and HF copies of
one seed hold the same model (HF's copy with q/k rows permuted as HF's conversion does). Matrices are
N(0, std), norm weights 1 + N(0, std), biases N(0, std). Tests, benchmarks and the embedded default all
load these through the real loader.

    python -m pixtral_rt.random_weights OUT_DIR --preset Pixtral-12B-2409 --format mistral
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch

from .checkpoint import expected_shapes, mistral_to_hf_key, permute_for_hf, rotary_heads
from .config import PRESETS, PixtralArgs, tiny


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


def write_random_checkpoint(folder: str | Path, args: PixtralArgs, fmt: str = "mistral", seed: int = 0,
                            std: float = 0.02, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 << 30,
                            legacy_hf_keys: bool = False, device="cpu", progress: bool = False) -> Path:
    """Write params.json/config.json + safetensors shards (+ index) + tekken.json into `folder`.
    Files are written under temporary names and renamed at the end: a crash leaves no half checkpoint."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(args)
    esize = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        nbytes = esize
        for d in s:
            nbytes *= d
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
            t = random_tensor(k, shapes[k], seed, std, device, dtype)
            if fmt == "hf":
                heads = rotary_heads(k, args)
                if heads:
                    t = permute_for_hf(t, heads)
                k = mistral_to_hf_key(k, legacy=legacy_hf_keys)
            tensors[k] = t.contiguous().cpu()
            weight_map[k] = name
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
        (folder / "config.json").write_text(json.dumps(args.to_hf_config(), indent=1))
    _copy_tokenizer(folder, args)
    return folder


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
    a = p.parse_args(argv)
    if a.preset == "tiny":
        args = tiny()
    elif a.preset == "tiny-mistral3":
        args = tiny(merge=True)
    elif a.preset in PRESETS:
        args = PRESETS[a.preset]
    else:
        p.error(f"unknown preset {a.preset!r}")
    write_random_checkpoint(a.folder, args, a.format, a.seed, dtype=getattr(torch, a.dtype), device=a.device,
                            progress=True)
    print(f"wrote {a.format}-format {args.name} random weights (seed {a.seed}) to {a.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
