"""Command-line flags that the CLI (generate.py) and the server (serve.py) share: which weights, in which
precision, over how many processes, on which device."""
from __future__ import annotations

import argparse


def add_weight_flags(group) -> None:
    """--quantization, --tensor-parallel, --random-weights on an argparse group."""
    group.add_argument("--quantization", choices=["fp8", "int4"],
                       help="fp8: run the text decoder's linears in FP8 e4m3 (per-channel weight scales, per-token "
                            "activation scales in prefill); int4: 4-bit weights, W4A16 (round to nearest, "
                            "symmetric, one scale per 128 inputs; activations stay bf16). Quantised at load from a "
                            "bf16 checkpoint of either format; the vision encoder, adapter, embeddings and lm_head "
                            "stay bf16. A quantised compressed-tensors checkpoint (FP8 float-quantized, e.g. "
                            "pixtral-12b-FP8-dynamic, or int4 pack-quantized W4A16) runs in its own scheme "
                            "without this flag")
    group.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="shard the text decoder over N processes (one per GPU; torch.distributed: NCCL on "
                            "GPUs, gloo with --device cpu). The command starts the workers itself; under torchrun "
                            "the launcher's world is used. Default 1")
    group.add_argument("--random-weights", metavar="PRESET",
                       help="benchmark / testing aid: no checkpoint; seeded random weights of PRESET (tiny, "
                            "Pixtral-12B-2409, Pixtral-Large-Instruct-2411, Mistral-Small-3.1-24B-2503) generated "
                            "on the device at load (with --quantization fp8, Pixtral-Large fits one 141 GB GPU). "
                            "The text is meaningless")


def add_runtime_flags(group) -> None:
    """The measured alternatives (pixtral_rt/options.py RuntimeOptions) as flags: --tp-lm-head, --tp-allreduce,
    --preprocess, --fp8-decode."""
    from .options import ALLREDUCE_IMPLS, FP8_DECODE_MODES, LM_HEAD_MODES
    group.add_argument("--tp-lm-head", choices=LM_HEAD_MODES, default="vocab",
                       help="with --tensor-parallel: split the lm_head by vocabulary rows and all-gather the logits "
                            "(vocab, the default: measured faster) or keep it whole on every rank (replicated)")
    group.add_argument("--tp-allreduce", choices=ALLREDUCE_IMPLS, default="nccl",
                       help="with --tensor-parallel on GPUs: the decode step's all-reduces by NCCL (default) or by "
                            "torch symmetric memory's one-shot kernel (symm; one GPU per rank)")
    group.add_argument("--preprocess", choices=("auto", "numpy"), default="auto",
                       help="host image preprocessing: the native C++ op when built (auto, default) or the NumPy "
                            "fallback (numpy; same results, slower)")
    group.add_argument("--fp8-decode", choices=FP8_DECODE_MODES, default="auto",
                       help="with FP8 weights: decode steps on bf16 activations (w8a16: the FP8-weight GEMV, faster "
                            "for one sequence), on activations quantised per token as in prefill (w8a8: the FP8 "
                            "tensor-core kernel, faster for batches), or auto (default): w8a16 for one sequence, "
                            "w8a8 for batches")


def runtime_options(args: argparse.Namespace):
    """The RuntimeOptions the flags of add_runtime_flags give."""
    from .options import RuntimeOptions
    return RuntimeOptions(tp_lm_head=args.tp_lm_head, tp_allreduce=args.tp_allreduce, preprocess=args.preprocess,
                          fp8_decode=args.fp8_decode)


def check_weight_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shared flags' values, before anything loads; --device too (both commands have it), so a missing
    GPU is reported in one line with exit 2, not after a load (or from the server's engine process)."""
    if args.tensor_parallel < 1:
        parser.error(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    if args.tensor_parallel > 1 and args.quantization == "int4":
        parser.error("--quantization int4 with --tensor-parallel is not supported yet: run int4 on one GPU")
    check_device_flag(parser, getattr(args, "device", None))


def check_device_flag(parser: argparse.ArgumentParser, device: str | None) -> None:
    """Exit 2 with "pixtral_rt: error: --device ..." when `device` is not there (loading.resolve_device)."""
    from .loading import resolve_device   # torch is imported by then anyway; not at `--help` time
    from .errors import DeviceError
    try:
        resolve_device(device)
    except DeviceError as exc:
        parser.exit(2, f"pixtral_rt: error: {exc}\n")
