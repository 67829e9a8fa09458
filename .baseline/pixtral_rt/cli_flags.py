"""Command-line flags that the CLI (generate.py) and the server (serve.py) share: which weights, in which
precision, over how many processes, on which device."""
from __future__ import annotations

import argparse


def add_weight_flags(group) -> None:
    """--quantization, --tensor-parallel, --random-weights on an argparse group."""
    group.add_argument("--quantization", choices=["fp8"],
                       help="fp8: run the text decoder's linears in FP8 e4m3 (per-channel weight scales, per-token "
                            "activation scales in prefill), quantised at load from a bf16 checkpoint of either "
                            "format; the vision encoder, adapter, embeddings and lm_head stay bf16. An FP8 "
                            "checkpoint (compressed-tensors, e.g. pixtral-12b-FP8-dynamic) is FP8 without this flag")
    group.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="shard the text decoder over N processes (one per GPU; torch.distributed: NCCL on "
                            "GPUs, gloo with --device cpu). The command starts the workers itself; under torchrun "
                            "the launcher's world is used. Default 1")
    group.add_argument("--random-weights", metavar="PRESET",
                       help="benchmark / testing aid: no checkpoint; seeded random weights of PRESET (tiny, "
                            "Pixtral-12B-2409, Pixtral-Large-Instruct-2411, Mistral-Small-3.1-24B-2503) generated "
                            "on the device at load (with --quantization fp8, Pixtral-Large fits one 141 GB GPU). "
                            "The text is meaningless")


def check_weight_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shared flags' values, before anything loads; --device too (both commands have it), so a missing
    GPU is reported in one line with exit 2, not after a load (or from the server's engine process)."""
    if args.tensor_parallel < 1:
        parser.error(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    check_device_flag(parser, getattr(args, "device", None))


def check_device_flag(parser: argparse.ArgumentParser, device: str | None) -> None:
    """Exit 2 with "pixtral_rt: error: --device ..." when `device` is not there (engine.resolve_device)."""
    from .engine import resolve_device   # torch is imported by then anyway; not at `--help` time
    from .errors import DeviceError
    try:
        resolve_device(device)
    except DeviceError as exc:
        parser.exit(2, f"pixtral_rt: error: {exc}\n")
