"""Shared pieces of the quantised-weight tests, one code path for both schemes ("fp8": FP8-dynamic, "int4": W4A16)
where the logic is the same. Tests whose body is the same for both are parametrised over SCHEMES in
test_checkpoint_quantized.py and test_engine_quantized.py; what only one scheme has stays in its test_*_fp8.py /
test_*_int4.py.

- checkpoints: the good checkpoints a scheme's tests copy and edit, what they must load as, edits of a copy
  (model.safetensors, config.json), planning refusals, and the no_weight_reads fixture;
- engine: the tiny checkpoints of the engine tests;
- decoder: a state dict quantised as the loader does, the scheme's reference model, and the FastDecoder checks
  against it (tiny model on the CPU; full-size 12B on a GPU).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixtral_rt import checkpoint as ckpt
from pixtral_rt import fp8, int4
from pixtral_rt.checkpoint import CheckpointError, plan_checkpoint, read_safetensors_header
from pixtral_rt.config import tiny
from pixtral_rt.quantization_config import QuantizationConfig
from pixtral_rt.random_weights import random_state_dict, write_random_checkpoint
from pixtral_rt.reference.fp8_linear import Fp8Linear, install_fp8_linears
from pixtral_rt.reference.int4_linear import Int4Linear, install_int4_linears

SCHEMES = ("fp8", "int4")
LABEL = {"fp8": "FP8", "int4": "int4"}                           # how messages and prints name the scheme
DATA_DTYPE = {"fp8": fp8.FP8_DTYPE, "int4": torch.int32}        # the dtype of a quantised linear's data tensor
REFERENCE_LINEAR = {"fp8": Fp8Linear, "int4": Int4Linear}       # the reference model's quantised linear

# ---------------------------------------------------------------------------------------- checkpoints
ARGS = tiny(vocab_size=512)           # the checkpoint tests' model
SEED = {"fp8": 1, "int4": 2}          # each scheme's checkpoint tests draw their own random model
Q0 = "model.language_model.layers.0.self_attn.q_proj"  # an HF module of the new key layout
OUT_Q = ARGS.text.n_heads * ARGS.text.head_dim          # 512


def write_good_checkpoints(root: Path, scheme: str, also: tuple[str, ...] = ()) -> dict[str, Path]:
    """The random model of SEED[scheme] written as: `scheme` (new HF keys, one file), `scheme`-legacy-sharded
    (legacy HF keys, 1 MiB shards), bf16-hf, bf16-mistral, and one checkpoint of each scheme in `also`."""
    seed = SEED[scheme]
    good = {
        scheme: write_random_checkpoint(root / scheme, ARGS, "hf", seed=seed, quantization=scheme),
        f"{scheme}-legacy-sharded": write_random_checkpoint(root / f"{scheme}l", ARGS, "hf", seed=seed,
                                                            quantization=scheme, legacy_hf_keys=True,
                                                            shard_bytes=1 << 20),
        "bf16-hf": write_random_checkpoint(root / "hf", ARGS, "hf", seed=seed),
        "bf16-mistral": write_random_checkpoint(root / "mistral", ARGS, "mistral", seed=seed),
    }
    for other in also:
        good[other] = write_random_checkpoint(root / other, ARGS, "hf", seed=seed, quantization=other)
    return good


def quantized_keys(key: str, scheme: str) -> tuple[str, str]:
    """A decoder linear's `<name>.weight` -> the keys of its quantised (data, scale): fp8 keeps the weight key (an
    F8 tensor), int4 has weight_packed instead."""
    if scheme == "fp8":
        return key, fp8.scale_key(key)
    return int4.packed_key(key), int4.scale_key(key)


def quantize_state_dict(sd: dict, scheme: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """sd with every decoder linear quantised as the loader does (fp8: F8 weight + (out, 1) fp32 scale; int4: RTN,
    (out, in/8) int32 weight_packed + (out, in/128) scale); the other tensors cast to `dtype` (None: kept)."""
    out = {}
    for k, t in sd.items():
        if fp8.is_quantized_weight(k):        # the same decoder linears for both schemes
            data, scale = quantized_keys(k, scheme)
            out[data], out[scale] = fp8.quantize_weight(t) if scheme == "fp8" else int4.quantize_and_pack(t)
        else:
            out[k] = t if dtype is None else t.to(dtype)
    return out


def expected_state_dict(scheme: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the `scheme` checkpoint of SEED[scheme] must load as: the bf16 random model (as the writer draws it),
    decoder linears quantised, the rest in `dtype`."""
    return quantize_state_dict(random_state_dict(ARGS, seed=SEED[scheme]), scheme, dtype)


def copy(src: Path, tmp_path: Path) -> Path:
    """A copy of checkpoint folder `src` at tmp_path/ckpt, to edit."""
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """float8 has no torch.equal on CPU: compare its bytes (other dtypes as they are)."""
    return t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t


def assert_same_dict(a: dict, b: dict) -> None:
    """Same keys, and per key the same dtype, shape and bytes."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(as_bits(a[k]), as_bits(b[k])), k


def rewrite(path: Path, edit) -> None:
    """Apply edit(dict of tensors) to the safetensors file at `path`, in place."""
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def edit_config(folder: Path, edit) -> None:
    """Apply edit(dict) to the quantization_config of folder/config.json, in place."""
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg["quantization_config"])
    p.write_text(json.dumps(cfg))


def set_(key, value):
    """A tensor edit: sd[key] = value."""
    return lambda sd: sd.__setitem__(key, value)


def dense_layer1_mlp(names, scheme: str):
    """A tensor edit: layer 1's given mlp projections become bf16 (W dequantised, the quantised tensors dropped),
    as an ignore list would leave them."""
    def edit(sd):
        for n in names:
            k = f"model.language_model.layers.1.mlp.{n}"
            if scheme == "fp8":
                sd[f"{k}.weight"] = fp8.dequantize_weight(sd[f"{k}.weight"], sd.pop(f"{k}.weight_scale")).bfloat16()
            else:
                sd[f"{k}.weight"] = int4.dequantize(sd.pop(f"{k}.weight_packed"),
                                                    sd.pop(f"{k}.weight_scale")).bfloat16()
                sd.pop(f"{k}.weight_shape")
    return edit


def assert_planning_refuses(src: Path, tmp_path: Path, pattern: str, tensors=None, config=None) -> CheckpointError:
    """Plan an edited copy of checkpoint folder `src` (tensors: an edit of model.safetensors' dict; config: an edit of
    config.json's quantization_config): it must raise CheckpointError matching `pattern`, which is returned."""
    d = copy(src, tmp_path)
    if tensors is not None:
        rewrite(d / "model.safetensors", tensors)
    if config is not None:
        edit_config(d, config)
    with pytest.raises(CheckpointError, match=pattern) as e:
        plan_checkpoint(d)
    return e.value


def assert_ignores_as_package(folder: Path, raw: dict, cfg) -> QuantizationConfig:
    """Our ignore matching of quantization_config `raw` == compressed-tensors' match_name over its parsed `cfg`,
    for every module named in folder's model*.safetensors; returns our config."""
    from compressed_tensors.utils.match import match_name

    ours = QuantizationConfig.from_hf(raw, "config.json")
    modules = {k.rsplit(".", 1)[0] for f in folder.glob("model*.safetensors")
               for k in read_safetensors_header(f) if "." in k}
    for m in modules:
        assert ours.ignores(m) == any(match_name(m, t) for t in cfg.ignore), m
    return ours


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail if any tensor reader runs; afterwards check that every byte read from a .safetensors file lay in its
    header or in a weight_shape tensor (the 16 bytes int4 planning checks; FP8 files have none, so there only
    the header may be read)."""
    import safetensors

    def boom(*a, **k):
        raise AssertionError("a tensor was read while planning")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(ckpt._StagedReader, "read", boom)
    reads: list[tuple[str, int, int]] = []

    class Tracked:
        def __init__(self, path, mode="r", *a, **k):
            self.f, self.path = open(path, mode, *a, **k), str(path)

        def read(self, *a):
            start = self.f.tell()
            data = self.f.read(*a)
            reads.append((self.path, start, start + len(data)))
            return data

        def seek(self, *a):
            return self.f.seek(*a)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt, "open", Tracked, raising=False)
    yield
    monkeypatch.undo()
    for path, a, b in reads:
        if not path.endswith(".safetensors"):
            continue
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        allowed = [(0, 8 + n)] + [(8 + n + m["data_offsets"][0], 8 + n + m["data_offsets"][1])
                                  for k, m in header.items() if k.endswith(".weight_shape")]
        assert any(lo <= a and b <= hi for lo, hi in allowed), f"{path}: read bytes {a}..{b}, not header or shape"


# ---------------------------------------------------------------------------------------- engine
def write_engine_checkpoints(root: Path) -> Path:
    """The engine tests' tiny() random model of seed 3 as root/bf16 (Mistral layout), root/fp8 and root/int4 (HF)."""
    args = tiny()
    write_random_checkpoint(root / "bf16", args, "mistral", seed=3)
    for scheme in SCHEMES:
        write_random_checkpoint(root / scheme, args, "hf", seed=3, quantization=scheme)
    return root


# ---------------------------------------------------------------------------------------- decoder
def quantized_reference(args, sd: dict, device, dtype: torch.dtype, scheme: str):
    """The reference Transformer of text args holding `sd` (from quantize_state_dict) with the scheme's linears
    (Fp8Linear / Int4Linear) on `device`: quantised data and scales as they are, the rest in `dtype`."""
    from pixtral_rt.reference.transformer import Transformer

    with torch.device("meta"):
        m = Transformer(args)
    install = install_fp8_linears if scheme == "fp8" else install_int4_linears
    assert install(m, sd) == 7 * args.n_layers
    m.load_state_dict({k: (v if v.dtype == DATA_DTYPE[scheme] or k.endswith("_scale") else v.to(dtype)).to(device)
                       for k, v in sd.items()}, assign=True, strict=True)
    return m.eval()


@torch.no_grad()
def ref_incremental(model, seqs, splits, n_decode, fp8_decode: str = "w8a16"):
    """Per sequence: logits of the last prompt token (prompt forwards in the given chunks) then of each
    teacher-forced decode step (decode_mode(fp8_decode)): (1 + n_decode, vocab) fp32."""
    from pixtral_rt.reference.fp8_linear import decode_mode
    from pixtral_rt.reference.transformer import KVCache

    dev = model.tok_embeddings.weight.device
    out = []
    for toks, cuts in zip(seqs, splits):
        cache = KVCache.empty(model.args, len(toks), dev, model.tok_embeddings.weight.dtype)
        h = model.tok_embeddings(torch.tensor(toks, device=dev))
        P = len(toks) - n_decode
        bounds = [0] + cuts + [P]
        for a, c in zip(bounds[:-1], bounds[1:]):
            last = model(h[a:c], a, cache)[-1]
        rows = [last]
        with decode_mode(model, fp8_decode):
            for p in range(P, len(toks)):
                rows.append(model(h[p:p + 1], p, cache)[-1])
        out.append(torch.stack(rows).float())
    return out


def tiny_decoder_case(device, scheme: str, prompt_lens: tuple[int, ...], n_seqs: int, n_decode: int):
    """The tiny CPU decoder tests' inputs: the tiny(vocab_size=1000) text model (torch seed 0, randomize seed 0) on
    `device`, its state dict with `scheme` linears, and token sequences (generator seed 1) of prompt_lens[i] +
    n_decode tokens, the last n_seqs of them. -> (text args, model, sd, seqs)"""
    from pixtral_rt.reference.transformer import Transformer
    from tests.test_decoder_fast import randomize

    args = tiny(vocab_size=1000).text
    torch.manual_seed(0)
    model = Transformer(args).to(device)
    randomize(model, 0)
    sd = quantize_state_dict(model.state_dict(), scheme)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n + n_decode,), generator=g).tolist() for n in prompt_lens][-n_seqs:]
    return args, model, sd, seqs


def with_dense_linear(sd: dict, dense_sd: dict, key: str, scheme: str) -> dict:
    """A copy of quantised `sd` in which decoder linear `key` (<name>.weight) is dense again (from dense_sd), its
    quantised tensors dropped (an fp8 weight is replaced where it stands)."""
    out = dict(sd)
    out[key] = dense_sd[key]
    for k in quantized_keys(key, scheme):
        if k != key:
            del out[k]
    return out


def assert_fast_matches_reference(dec, model, sd: dict, scheme: str, device, seqs, splits, n_decode,
                                  fp8_decode: str = "w8a16") -> None:
    """The tiny fp32 check: `dec` (run_fast: prefill in `splits`, then n_decode teacher-forced steps) vs the fp32
    reference of the scheme holding `sd`, and vs `model` (the unquantised model sd came from). Fast within 1e-4
    (rel) of its reference with the same argmax, and more than 10x further from the unquantised model (the
    quantised weights really ran). fp8_decode: the decode math of the FP8 reference (the decoder's own)."""
    from tests.test_decoder_fast import rel, run_fast

    from pixtral_rt.options import fp8_decode_for

    fast = run_fast(dec, seqs, splits=splits, n_decode=n_decode)
    # the decode math of a batch of len(seqs) rows ("auto" decides by the rows, as the decoder does)
    ref = ref_incremental(quantized_reference(model.args, sd, device, torch.float32, scheme), seqs, splits, n_decode,
                          fp8_decode_for(fp8_decode, len(seqs)))
    bf = ref_incremental(model.eval(), seqs, splits, n_decode)     # the unquantised model
    for f, r, b in zip(fast, ref, bf):
        assert not torch.isnan(f).any()
        assert rel(f, r) < 1e-4, rel(f, r)
        assert torch.equal(f.argmax(-1), r.argmax(-1))
        assert rel(f, b) > 10 * rel(f, r)          # quantised: further from the bf16 model than from its ref


def check_pixtral12b_vs_reference(scheme: str, batch: int, fp8_decode: str = "w8a16") -> None:
    """GPU: full-size 12B decoder (random weights, bf16) with `scheme` linears: prefill + 24 decode steps replayed
    from a CUDA graph (B = 1: the GEMV decode chain with PDL; B = 2: the skinny GEMM) vs the scheme's reference
    in fp32: error <= 2x the bf16 reference's own error + 1e-3. The gap to the bf16 decoder is printed (a quality
    figure, not a test)."""
    from pixtral_rt.config import PIXTRAL_12B
    from pixtral_rt.decoder import FastDecoder
    from pixtral_rt.reference.transformer import Transformer
    from tests.test_decoder_fast import randomize, rel, run_fast

    args = PIXTRAL_12B.text
    with torch.device("cuda"):
        model = Transformer(args).to(torch.bfloat16)
    randomize(model, 0)
    sd = quantize_state_dict(model.state_dict(), scheme)
    bf_sd = {k: v for k, v in model.state_dict().items()}
    n_decode = 24
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1000, args.vocab_size, (n + n_decode,), generator=g).tolist() for n in (97, 300)][:batch]
    splits = [[40]] * batch
    dec = FastDecoder(args, dict(sd), max_batch=batch, max_seq=512, fp8_decode=fp8_decode)
    fast = run_fast(dec, seqs, splits, n_decode, graph=True)
    del dec
    from pixtral_rt.options import fp8_decode_for
    fp8_decode = fp8_decode_for(fp8_decode, batch)        # the reference's decode math: the decoder's at this batch
    ref16 = ref_incremental(quantized_reference(args, sd, "cuda", torch.bfloat16, scheme), seqs, splits, n_decode,
                            fp8_decode)
    ref32 = ref_incremental(quantized_reference(args, sd, "cuda", torch.float32, scheme), seqs, splits, n_decode,
                            fp8_decode)
    del model
    torch.cuda.empty_cache()
    dec_bf = FastDecoder(args, bf_sd, max_batch=batch, max_seq=512)
    bf = run_fast(dec_bf, seqs, splits, n_decode)
    name = LABEL[scheme]
    for b, (f, r16, r32, x) in enumerate(zip(fast, ref16, ref32, bf)):
        err, err_ref = rel(f, r32), rel(r16, r32)
        print(f"seq {b}: {name} fast vs {name} ref32 {err:.3e} (ref bf16 {err_ref:.3e}); {name} vs bf16 decoder "
              f"{rel(f, x):.3e}, argmax agreement {(f.argmax(-1) == x.argmax(-1)).float().mean():.2f}")
        assert not torch.isnan(f).any()
        assert err <= 2 * err_ref + 1e-3, (b, err, err_ref)
