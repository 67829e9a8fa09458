"""One way to build the model: checkpoint or random preset -> weights -> vision encoder + decoder on the
device -> KV pool sized from free memory. LLMEngine.load and every tensor-parallel rank build from here.

    src = resolve_model(folder_or_None, device, dtype, fmt)      # device, dtype, checkpoint plan, tokenizer
    model = build_model(src, max_batch=64, max_seq=ctx + 64, max_images=12)   # the paged model of the engine
    tokens = kv_pool_tokens(src, ctx, page_size, reserve_bytes)  # how many KV tokens fit beside it

build_model gives the engine's model interface (pixtral_rt/serving/paged_model.py): on a GPU the fast model
(FastDecoder over Triton kernels, FastVisionEncoder with its CUDA graphs), on CPU the plain PyTorch
reference model (the oracle) over the same pages. shard=(rank, world): this rank's slices of the text
decoder (pixtral_rt/sharding.py) with the collectives between ranks (pixtral_rt/collectives.py);
text_only: no vision encoder (tensor-parallel followers).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import load_tokenizer
from .config import PIXTRAL_12B, PixtralArgs, preset, tiny
from .errors import DeviceError
from .options import RuntimeOptions

# checkpoint keys of the text decoder; every other key belongs to the vision encoder / adapter
TEXT_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.")
GIB = 1 << 30


def default_random_model(device: torch.device) -> tuple[PixtralArgs, Path]:
    """The embedded default: seeded random weights of the real architecture (Pixtral-12B on a GPU, a tiny
    config on CPU), written once to a cache folder and then loaded through the real loader."""
    from .random_weights import write_random_checkpoint
    args = PIXTRAL_12B if device.type == "cuda" else tiny()
    root = Path(os.environ.get("PIXTRAL_RT_CACHE", Path.home() / ".cache" / "pixtral_rt"))
    folder = root / f"random-{args.name}-seed0"
    if not (folder / "params.json").is_file():
        print(f"pixtral_rt: writing random {args.name} weights to {folder} (once)", file=sys.stderr)
        tmp = folder.with_name(folder.name + ".partial")
        write_random_checkpoint(tmp, args, "mistral", seed=0, device=device, progress=True)
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        tmp.rename(folder)
    return args, folder


def decoder_weight_bytes(args: PixtralArgs, dtype_bytes: int = 2) -> int:
    """Bytes every decode step must read: all decoder matrices except the embedding table (one row only)."""
    t = args.text
    per_layer = (t.dim * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * t.dim
                 + 3 * t.dim * t.hidden_dim + 2 * t.dim)
    return (t.n_layers * per_layer + t.vocab_size * t.dim + t.dim) * dtype_bytes


def kv_bytes_per_token(args: PixtralArgs, dtype_bytes: int = 2) -> int:
    t = args.text
    return 2 * t.n_layers * t.n_kv_heads * t.head_dim * dtype_bytes


QUANTIZATIONS = ("fp8", "int4")


@dataclass
class ModelSource:
    """What a load starts from: device, dtype, checkpoint plan, config and tokenizer (no weights yet)."""
    device: torch.device
    dtype: torch.dtype
    plan: object               # CheckpointPlan, or None for weights drawn on the device (random_preset)
    args: PixtralArgs
    folder: Path | None
    tokenizer: object
    random_default: bool       # no real weights (the embedded default or random_preset): text is meaningless
    t0: float
    name: str                  # for messages: the folder, or "random <preset>"
    quantization: str | None = None   # "fp8" / "int4": decoder linears in FP8 (pixtral_rt/fp8.py) / int4 (int4.py)
    random_preset: str | None = None  # --random-weights PRESET: seeded weights generated on the device

    @property
    def format(self) -> str:
        return self.plan.format if self.plan is not None else "random (generated on the device)"

    def load_weights(self, progress: bool = True, shard: tuple[int, int] | None = None,
                     text_only: bool = False, lm_head: str | None = None) -> dict[str, torch.Tensor]:
        """The weight dictionary the loader produces (our key names; FP8 linears as weight + weight_scale, int4
        ones as weight_packed + weight_scale):
        from the checkpoint, or drawn on the device for random_preset (same per-name seeding as the writer).
        shard=(rank, world): this rank's slices only (pixtral_rt/sharding.py; lm_head "vocab": the lm_head's
        rows split too, "replicated": whole); text_only: the text decoder's tensors only (tensor-parallel
        followers)."""
        from .checkpoint import expected_shapes, load_state_dict
        keys = [k for k in expected_shapes(self.args) if k.startswith(TEXT_PREFIXES)] if text_only else None
        if self.random_preset is not None:
            from .random_weights import random_state_dict_on_device
            return random_state_dict_on_device(self.args, seed=0, device=self.device, dtype=self.dtype,
                                               quantization=self.quantization, progress=progress, shard=shard,
                                               keys=keys, lm_head=lm_head)
        return load_state_dict(self.plan, device=self.device, dtype=self.dtype, progress=progress, keys=keys,
                               quantization=self.quantization, shard=shard, lm_head=lm_head)

    def precision(self) -> str:
        """For the load message and --json: which weights are in which precision."""
        dt = str(self.dtype).replace("torch.", "")
        if self.quantization == "int4":
            g = getattr(getattr(self.plan, "quantization", None), "group_size", None) or 128
            return (f"int4 decoder linears (wq wk wv wo w1 w2 w3: symmetric 4-bit weights, one scale per {g} "
                    f"inputs, W4A16: activations {dt}); embeddings, lm_head, vision encoder, adapter {dt}")
        if self.quantization != "fp8":
            return dt
        return (f"fp8 e4m3 decoder linears (wq wk wv wo w1 w2 w3: per-channel weight scales, per-token "
                f"dynamic activation scales in prefill); embeddings, lm_head, vision encoder, adapter {dt}")


def resolve_device(device: str | None) -> torch.device:
    """--device (cuda, cuda:N or cpu; None: cuda when a GPU is visible, else cpu) as a torch.device, checked
    before anything loads: DeviceError (exit 2 in the CLI and the server) for a device that is not there
    or not one this runtime runs on, rather than a RuntimeError from deep inside the first allocation."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise DeviceError(f"--device {device!r} is not a device this runtime runs on: use cuda, cuda:N (the "
                          "N-th visible GPU) or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else
               "this torch build has no CUDA" if torch.version.cuda is None else "no driver or GPU found")
        raise DeviceError(f"--device {device}: no CUDA GPU is visible ({why}); use --device cpu, or run where "
                          "a GPU is")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def resolve_model(model: str | Path | None, device: str | None, dtype: str | None, fmt: str | None,
                  quantization: str | None = None, random_weights: str | None = None, quiet: bool = False,
                  with_tokenizer: bool = True) -> ModelSource:
    """Device and dtype (CUDA + bf16 when a GPU is visible, else CPU + fp32), the checkpoint plan (format
    detected and printed; the embedded random default when model is None) and the tokenizer.
    quantization "fp8" / "int4": quantise the decoder linears at load (an FP8 / int4 checkpoint is quantised
    without asking; asking for the other scheme of a quantised checkpoint is a ValueError).
    random_weights PRESET: no checkpoint; seeded random weights of that preset generated on the device at
    load (a benchmark / testing aid for models whose checkpoint does not fit the disk)."""
    from .checkpoint import plan_checkpoint

    t0 = time.perf_counter()
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    dev = resolve_device(device)
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
              "float32": torch.float32, "fp32": torch.float32, None: None}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r} is not one of bfloat16, float16, float32")
    tdtype = dtypes[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if random_weights is not None:
        if model is not None:
            raise ValueError("give a checkpoint (--model) or --random-weights PRESET, not both")
        try:
            args = preset(random_weights)
        except ValueError as exc:
            raise ValueError(f"--random-weights: {exc}") from None
        if not quiet:
            print(f"pixtral_rt: random {args.name} weights (seed 0) generated on {dev} at load "
                  f"[random weights: the text will be meaningless]", file=sys.stderr)
        tokenizer = load_tokenizer(None, args) if with_tokenizer else None
        return ModelSource(dev, tdtype, None, args, None, tokenizer, True, t0, f"random {args.name}", quantization,
                           random_weights)
    random_default = model is None
    if random_default:
        default_args, folder = default_random_model(dev)
    else:
        folder = Path(model)
    plan = plan_checkpoint(folder, fmt)
    if getattr(plan, "quantization", None) is not None:
        own = plan.quantization.scheme   # the checkpoint's own scheme (checkpoint.py validated it)
        if quantization is not None and quantization != own:
            raise ValueError(f"{folder} is an {own} checkpoint (config.json's quantization_config): "
                             f"--quantization {quantization} cannot convert it; drop the flag")
        quantization = own
    if not quiet:
        print(f"pixtral_rt: {plan.describe()}" + (" [random weights: the text will be meaningless]"
                                                   if random_default else ""), file=sys.stderr)
    tokenizer = load_tokenizer(None if random_default else folder, plan.args) if with_tokenizer else None
    name = f"random {default_args.name}" if random_default else str(folder)
    return ModelSource(dev, tdtype, plan, plan.args, folder, tokenizer, random_default, t0, name, quantization)


def resolve_source(model, device, dtype, fmt, quantization=None, random_weights=None) -> ModelSource:
    """resolve_model without messages or tokenizer (tensor-parallel followers)."""
    return resolve_model(model, device, dtype, fmt, quantization, random_weights, quiet=True, with_tokenizer=False)


def load_reference_model(src: ModelSource, progress: bool = True):
    """The plain PyTorch reference model with the checkpoint's weights (built on meta, weights assigned)."""
    from .reference.model import PixtralModel
    return PixtralModel.from_state_dict(src.args, src.load_weights(progress))


def split_vision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the vision encoder's and adapter's tensors out of a full state dict (the text decoder's stay)."""
    return {k: sd.pop(k) for k in list(sd) if not k.startswith(TEXT_PREFIXES)}


def build_model(src: ModelSource, *, max_batch: int, max_seq: int, max_images: int, use_graphs: bool = True,
                progress: bool = True, shard: tuple[int, int] | None = None, text_only: bool = False,
                options: RuntimeOptions | None = None):
    """The paged model the serving engine runs (serving/paged_model.py interface) on src.device.
    GPU: FastPagedModel (FastDecoder + FastVisionEncoder); CPU: ReferencePagedModel (the reference model).
    max_seq: the longest sequence the decoder's RoPE table covers (context + one page).
    shard=(rank, world): tensor parallel, this rank's slices with the all-reduces (over the default
    process group, which the caller has joined); None: the whole model, no collectives.
    text_only: no vision encoder (followers of rank 0, which alone runs it)."""
    options = options or RuntimeOptions()
    if src.device.type == "cuda":
        return _fast_model(src, max_batch, max_seq, max_images, use_graphs, progress, shard, text_only, options)
    return _reference_model(src, progress, shard, text_only, options)


def _fast_model(src, max_batch, max_seq, max_images, use_graphs, progress, shard, text_only, options):
    from .decoder import FastDecoder
    from .serving.paged_model import FastPagedModel
    from .sharding import sharded_args
    from .vision import FastVisionEncoder
    sd = src.load_weights(progress, shard=shard, text_only=text_only, lm_head=options.tp_lm_head)
    torch.cuda.empty_cache()     # transients of loading (random draws, quantisation) out of the cache:
    #                              the fused wqkv / w13 below need contiguous room (Pixtral-Large FP8)
    vision = None
    if not text_only:
        vision_sd = split_vision(sd)
        vision = FastVisionEncoder.from_state_dict(vision_sd, src.args, src.dtype, src.device)
        del vision_sd
    args, tp = src.args, {}
    if shard is not None:
        args = dataclasses.replace(src.args, text=sharded_args(src.args.text, shard[1], options.tp_lm_head))
        tp = dict(tp_group="world", vocab_parallel=options.tp_lm_head == "vocab", tp_allreduce=options.tp_allreduce)
    # consume: frees each unfused weight as it is fused
    dec = FastDecoder(args.text, sd, max_batch=max_batch, max_seq=max_seq, device=src.device, dtype=src.dtype,
                      consume=True, fp8_decode=options.fp8_decode, **tp)
    sd.clear()
    torch.cuda.empty_cache()
    return FastPagedModel(dec, vision, args, src.device, max_images, use_graphs)


def _reference_model(src, progress, shard, text_only, options):
    from .serving.paged_model import ReferencePagedModel
    if shard is None:
        return ReferencePagedModel(load_reference_model(src, progress), src.args, src.device, src.dtype,
                                   fp8_decode=options.fp8_decode)
    m, args = reference_shard(src, shard, text_only, progress, lm_head=options.tp_lm_head)
    return ReferencePagedModel(m, args, src.device, src.dtype, fp8_decode=options.fp8_decode)


def reference_shard(src: ModelSource, shard: tuple[int, int], text_only: bool, progress: bool = False,
                    lm_head: str = "vocab"):
    """The plain PyTorch model holding this rank's shard: PixtralModel (rank 0: + vision) or the text
    Transformer (followers), with the all-reduce hooks installed. Returns (model, sharded args)."""
    from .collectives import install_all_reduce
    from .reference.fp8_linear import install_fp8_linears
    from .reference.model import PixtralModel
    from .reference.transformer import Transformer
    from .sharding import sharded_args
    world, vocab_parallel = shard[1], lm_head == "vocab"
    sd = src.load_weights(progress, shard=shard, text_only=text_only, lm_head=lm_head)
    args = dataclasses.replace(src.args, text=sharded_args(src.args.text, world, lm_head))
    with torch.device("meta"):
        m = Transformer(args.text) if text_only else PixtralModel(args)
        if vocab_parallel:          # this rank's rows of the lm_head (the embedding table stays whole)
            m.output = torch.nn.Linear(args.text.dim, args.text.vocab_size // world, bias=False)
    install_fp8_linears(m, sd)
    m.load_state_dict(sd, assign=True, strict=True)
    install_all_reduce(m, vocab_parallel=vocab_parallel)
    return m.eval(), args


def kv_pool_tokens(src: ModelSource, max_context: int, page_size: int, reserve_bytes: int, world: int = 1,
                   kv_tokens: int | None = None) -> int:
    """Tokens of KV cache the page pool holds: kv_tokens if given; on a GPU what the free memory left after
    the weights (and the graphs the caller captured so far) holds minus reserve_bytes for activations
    (each rank holds 1/world of the KV heads); on CPU 4 full contexts."""
    if kv_tokens is not None:
        return int(kv_tokens)
    if src.device.type != "cuda":
        return 4 * (max_context + page_size)
    free, _ = torch.cuda.mem_get_info(src.device)
    per_token = kv_bytes_per_token(src.args, src.dtype.itemsize) // world
    return max(0, free - reserve_bytes) // per_token


def check_kv_pool(n_pages: int, page_size: int, max_context: int) -> None:
    """RuntimeError when the pool cannot hold one request of min(context, 4096) tokens (page 0 is the trash
    page)."""
    if (n_pages - 1) * page_size < min(max_context, 4096):
        raise RuntimeError(f"not enough memory for a KV cache: room for {max(0, n_pages - 1) * page_size} "
                           f"tokens, fewer than one request of {min(max_context, 4096)}")
