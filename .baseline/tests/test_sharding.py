"""Tensor-parallel sharded loading (pixtral_rt.sharding + load_state_dict(shard=...)), on the CPU: each rank's
dictionary is its slices of the full load bit for bit (Mistral, HF in both key layouts, FP8 HF), each rank
reads exactly its slices plus the replicated tensors (counted from the files, through both readers), load-time
FP8 quantisation of slices, and the divisibility error raised before a byte is read."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pixtral_rt import checkpoint as ckpt
from pixtral_rt import fp8
from pixtral_rt.checkpoint import (expected_shapes, hf_to_mistral_key, load_state_dict, permute_for_hf,
                                   plan_checkpoint, unpermute_from_hf)
from pixtral_rt.config import PIXTRAL_12B, PIXTRAL_LARGE, MISTRAL_SMALL_31, tiny
from pixtral_rt.random_weights import write_random_checkpoint
from pixtral_rt.sharding import (check_divisible, shard_range, shard_rule, shard_tensor, sharded_args,
                                 valid_sizes)

ARGS = tiny(vocab_size=512)  # 4 heads, 2 KV heads, FFN 512
WORLD = 2
SEED = 3


@pytest.fixture(autouse=True)
def replicated_lm_head(monkeypatch):
    """The layout these tests spell out keeps the lm_head whole; the vocab-parallel lm_head (the default) has
    its own test below, which sets the variable itself."""
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", "replicated")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    return {
        "mistral": write_random_checkpoint(root / "mistral", ARGS, "mistral", seed=SEED),
        "hf": write_random_checkpoint(root / "hf", ARGS, "hf", seed=SEED),
        "hf-legacy-sharded": write_random_checkpoint(root / "hfl", ARGS, "hf", seed=SEED, legacy_hf_keys=True,
                                                     shard_bytes=1 << 20),
        "fp8": write_random_checkpoint(root / "fp8", ARGS, "hf", seed=SEED, quantization="fp8"),
        "fp8-legacy-sharded": write_random_checkpoint(root / "fp8l", ARGS, "hf", seed=SEED, quantization="fp8",
                                                      legacy_hf_keys=True, shard_bytes=1 << 20),
    }


@pytest.fixture
def small_staging(monkeypatch):
    """Staging buffers of 1000 bytes: slices and per-row ranges straddle buffers, both buffers take turns."""
    monkeypatch.setattr(ckpt._StagedReader.__init__, "__defaults__", (1000,))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def load(folder, **kw) -> dict[str, torch.Tensor]:
    return load_state_dict(plan_checkpoint(folder), progress=False, **kw)


def rank_shapes(world: int) -> dict[str, tuple[int, ...]]:
    """The per-rank module shapes: the reference model built with sharded_args."""
    return expected_shapes(dataclasses.replace(ARGS, text=sharded_args(ARGS.text, world)))


# ---------------------------------------------------------------------------------------- the rule
def test_shard_rule_names():
    for i in (0, 17):
        for n in "qkv":
            assert shard_rule(f"layers.{i}.attention.w{n}.weight") == 0
            assert shard_rule(f"layers.{i}.attention.w{n}.weight_scale") == 0
        for n in "13":
            assert shard_rule(f"layers.{i}.feed_forward.w{n}.weight") == 0
            assert shard_rule(f"layers.{i}.feed_forward.w{n}.weight_scale") == 0
        assert shard_rule(f"layers.{i}.attention.wo.weight") == 1
        assert shard_rule(f"layers.{i}.feed_forward.w2.weight") == 1
        assert shard_rule(f"layers.{i}.attention.wo.weight_scale") is None  # per output channel
        assert shard_rule(f"layers.{i}.feed_forward.w2.weight_scale") is None
        assert shard_rule(f"layers.{i}.attention_norm.weight") is None
        assert shard_rule(f"layers.{i}.ffn_norm.weight") is None
    for k in ["tok_embeddings.weight", "norm.weight", "output.weight", "patch_merger.merging_layer.weight",
              "vision_encoder.transformer.layers.0.attention.wq.weight",
              "vision_encoder.transformer.layers.0.attention.wo.weight",
              "vision_encoder.transformer.layers.0.feed_forward.w1.weight",
              "vision_language_adapter.w_in.weight", "pre_mm_projector_norm.weight"]:
        assert shard_rule(k) is None, k
    # every tensor of the tiny model is covered: the decoder's linears are split, the rest replicated
    for k in expected_shapes(ARGS):
        assert (shard_rule(k) is not None) == fp8.is_quantized_weight(k), k


def test_shard_range_and_tensor():
    assert shard_range("layers.0.attention.wq.weight", (512, 256), 1, 2) == (0, 256, 512)
    assert shard_range("layers.0.feed_forward.w2.weight", (256, 512), 0, 4) == (1, 0, 128)
    assert shard_range("norm.weight", (256,), 1, 2) is None
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        shard_range("layers.0.attention.wq.weight", (512, 256), 2, 2)
    with pytest.raises(ValueError, match=r"does not split into 3 equal parts"):
        shard_range("layers.0.attention.wq.weight", (512, 256), 0, 3)
    w = torch.randn(8, 6)
    assert torch.equal(torch.cat([shard_tensor(w, "layers.0.attention.wo.weight", r, 3) for r in range(3)], 1), w)
    assert torch.equal(torch.cat([shard_tensor(w, "layers.0.attention.wk.weight", r, 2) for r in range(2)], 0), w)
    assert shard_tensor(w, "norm.weight", 1, 2) is w
    part = shard_tensor(w, "layers.0.feed_forward.w2.weight", 1, 2)
    assert part.is_contiguous() and part.data_ptr() != w.data_ptr()
    w8 = w.to(fp8.FP8_DTYPE)
    assert torch.equal(bits(shard_tensor(w8, "layers.0.feed_forward.w2.weight", 0, 2)), bits(w8)[:, :3])


@pytest.mark.parametrize("heads,world", [(4, 2), (4, 4), (2, 2), (32, 8)])
def test_unpermuting_a_slice_equals_slicing_the_unpermuted(heads, world):
    """HF's rotary permutation stays inside each head: a row block un-permuted with heads / world heads is the
    same block of the un-permuted full tensor."""
    hd, k = 128, 24
    hf = permute_for_hf(torch.randn(heads * hd, k), heads)
    full = unpermute_from_hf(hf, heads)
    for r in range(world):
        key = "layers.0.attention.wq.weight"
        assert torch.equal(unpermute_from_hf(shard_tensor(hf, key, r, world), heads // world),
                           shard_tensor(full, key, r, world))


def test_divisibility_messages():
    check_divisible(ARGS, 2)
    check_divisible(ARGS.text, 1)
    with pytest.raises(ValueError) as e:
        check_divisible(PIXTRAL_12B, 3)
    assert str(e.value) == ("--tensor-parallel 3: 32 attention heads, 8 KV heads and FFN width 14336 must divide "
                            "evenly; valid sizes: 1, 2, 4, 8")
    with pytest.raises(ValueError, match=r"--tensor-parallel 4: 4 attention heads, 2 KV heads and FFN width 512 "
                                         r"must divide evenly; valid sizes: 1, 2$"):
        check_divisible(ARGS.text, 4)
    with pytest.raises(ValueError, match="positive integer"):
        check_divisible(ARGS, 0)
    assert valid_sizes(PIXTRAL_LARGE) == [1, 2, 4, 8] and valid_sizes(MISTRAL_SMALL_31) == [1, 2, 4, 8]
    s = sharded_args(PIXTRAL_12B.text, 4)
    assert (s.n_heads, s.n_kv_heads, s.hidden_dim) == (8, 2, 3584)
    assert dataclasses.replace(s, n_heads=32, n_kv_heads=8, hidden_dim=14336) == PIXTRAL_12B.text
    assert sharded_args(PIXTRAL_12B, 2).text == sharded_args(PIXTRAL_12B.text, 2)


# ---------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("staged", [False, True], ids=["cpu-reads", "staged-reads"])
@pytest.mark.parametrize("name", ["mistral", "hf", "hf-legacy-sharded", "fp8", "fp8-legacy-sharded"])
def test_rank_slices_concatenate_to_the_full_load(good, name, staged, small_staging):
    full = load(good[name])
    parts = [load(good[name], shard=(r, WORLD), staged=staged) for r in range(WORLD)]
    want_shapes = rank_shapes(WORLD)
    n_split = 0
    for k, t in full.items():
        got = [p[k] for p in parts]
        dim = shard_rule(k)
        if dim is None:
            assert all(same(g, t) for g in got), k
            continue
        n_split += 1
        assert torch.equal(torch.cat([bits(g) for g in got], dim), bits(t)), k
        assert all(g.dtype == t.dtype for g in got), k
        if k.endswith("_scale"):
            assert got[0].shape == (want_shapes[k[:-6]][0], 1), k
        else:
            assert got[0].shape == want_shapes[k], k
    for p in parts:
        assert p.keys() == full.keys()
    fp8_ckpt = name.startswith("fp8")
    assert n_split == ARGS.text.n_layers * (7 + 5 * fp8_ckpt)  # 7 linears (+ 5 row-split scales)
    if fp8_ckpt:
        assert parts[0]["layers.0.attention.wo.weight"].dtype == fp8.FP8_DTYPE
        assert parts[0]["layers.0.attention.wo.weight_scale"].shape == (ARGS.text.dim, 1)  # replicated


@pytest.mark.parametrize("staged", [False, True], ids=["cpu-reads", "staged-reads"])
@pytest.mark.parametrize("name", ["mistral", "hf-legacy-sharded", "fp8"])
def test_each_rank_reads_only_its_slices(good, name, staged, small_staging, monkeypatch):
    plan = plan_checkpoint(good[name])
    everything = sum(s.nbytes for s in plan.sources.values())
    split = sum(s.nbytes for k, s in plan.sources.items() if shard_rule(k) is not None)
    replicated = everything - split
    assert split > everything / 2  # the decoder's linears are most of the tiny model
    whole: list[str] = []
    if not staged:  # the mmap reader (safetensors get_tensor) may only see replicated tensors
        from safetensors import safe_open as real_safe_open

        class Spy:
            def __init__(self, *a, **k):
                self.f = real_safe_open(*a, **k)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def get_tensor(self, key):
                whole.append(key)
                return self.f.get_tensor(key)

        import safetensors
        monkeypatch.setattr(safetensors, "safe_open", Spy)
    stats: dict = {}
    load_state_dict(plan, progress=False, staged=staged, stats=stats)
    assert stats["bytes_read"] == everything
    for r in range(WORLD):
        stats = {}
        whole.clear()
        load_state_dict(plan, progress=False, staged=staged, shard=(r, WORLD), stats=stats)
        assert stats["bytes_read"] == replicated + split // WORLD == plan.shard_bytes(r, WORLD)
        assert stats["bytes_read"] < 0.8 * everything  # about 1 - split / 2 of it
        if not staged:
            ours = [hf_to_mistral_key(k) if plan.format == "hf" else k for k in whole]
            assert sorted(ours) == sorted(k for k in plan.sources if shard_rule(k) is None)
    stats = {"bytes_read": 5}
    load_state_dict(plan, keys=["layers.1.feed_forward.w2.weight"], progress=False, staged=staged,
                    shard=(1, WORLD), stats=stats)
    w2 = plan.sources["layers.1.feed_forward.w2.weight"]
    scale = plan.sources.get("layers.1.feed_forward.w2.weight_scale")
    assert stats["bytes_read"] == 5 + w2.nbytes // WORLD + (scale.nbytes if scale else 0)  # accumulates


@pytest.mark.parametrize("staged", [False, True], ids=["cpu-reads", "staged-reads"])
@pytest.mark.parametrize("src", ["mistral", "hf"])
def test_load_time_fp8_of_slices(good, src, staged):
    """Row blocks: the rows of the unsharded quantisation. Column blocks (wo/w2): quantised from this rank's
    columns alone, so the per-channel scales differ between ranks (each rank dequantises its partial sum)."""
    full_q = load(good[src], quantization="fp8")
    full = load(good[src])
    for r in range(WORLD):
        part = load(good[src], quantization="fp8", shard=(r, WORLD), staged=staged)
        assert part.keys() == full_q.keys()
        for k, t in part.items():
            base = k.removesuffix("_scale")
            dim = shard_rule(base)
            if dim is None:
                assert same(t, full_q[k]), k
            elif dim == 0:
                assert same(t, shard_tensor(full_q[k], k, r, WORLD)), k
            elif k == base:
                w8, s = fp8.quantize_weight(shard_tensor(full[k], k, r, WORLD))
                assert same(t, w8) and same(part[fp8.scale_key(k)], s), k
                assert s.shape == (full[k].shape[0], 1)
    s0 = load(good[src], quantization="fp8", shard=(0, WORLD), keys=["layers.0.attention.wo.weight"])
    s1 = load(good[src], quantization="fp8", shard=(1, WORLD), keys=["layers.0.attention.wo.weight"])
    assert not torch.equal(s0["layers.0.attention.wo.weight_scale"], s1["layers.0.attention.wo.weight_scale"])


def test_keys_and_transform_with_shard(good):
    seen = {}

    def transform(k, t):
        seen[k] = tuple(t.shape)
        return t * 1 if t.dtype != fp8.FP8_DTYPE else t

    keys = ["layers.1.attention.wk.weight", "layers.1.attention.wo.weight", "norm.weight"]
    sd = load(good["fp8"], keys=keys, shard=(1, WORLD), transform=transform)
    kv_rows = ARGS.text.n_kv_heads * ARGS.text.head_dim
    q_cols = ARGS.text.n_heads * ARGS.text.head_dim
    assert seen == {"layers.1.attention.wk.weight": (kv_rows // 2, ARGS.text.dim),
                    "layers.1.attention.wk.weight_scale": (kv_rows // 2, 1),
                    "layers.1.attention.wo.weight": (ARGS.text.dim, q_cols // 2),
                    "layers.1.attention.wo.weight_scale": (ARGS.text.dim, 1),
                    "norm.weight": (ARGS.text.dim,)}
    assert sd.keys() == seen.keys()


def test_world_one_is_the_plain_load(good):
    full = load(good["hf"])
    one = load(good["hf"], shard=(0, 1))
    assert full.keys() == one.keys() and all(same(one[k], full[k]) for k in full)
    plan = plan_checkpoint(good["hf"])
    assert plan.shard_bytes(0, 1) == sum(s.nbytes for s in plan.sources.values())


@pytest.mark.parametrize("staged", [False, True], ids=["cpu-reads", "staged-reads"])
def test_indivisible_world_fails_before_reading(good, staged, monkeypatch):
    import safetensors

    def boom(*a, **k):
        raise AssertionError("a checkpoint file was opened")

    plan = plan_checkpoint(good["mistral"])
    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(ckpt._StagedReader, "__init__", boom)
    monkeypatch.setattr(ckpt, "open", boom, raising=False)
    stats: dict = {}
    with pytest.raises(ValueError, match=r"^--tensor-parallel 3: 4 attention heads, 2 KV heads and FFN width 512 "
                                         r"must divide evenly; valid sizes: 1, 2$"):
        load_state_dict(plan, progress=False, staged=staged, shard=(0, 3), stats=stats)
    assert stats == {}
    with pytest.raises(ValueError, match="--tensor-parallel 3"):
        plan.shard_bytes(0, 3)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        load_state_dict(plan, progress=False, staged=staged, shard=(2, 2))
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        load_state_dict(plan, progress=False, staged=staged, shard=2)


def test_staged_reader_packs_ranges(tmp_path):
    data = torch.arange(5000, dtype=torch.int32)
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x" * 7 + data.numpy().tobytes())
    raw = data.view(torch.uint8)
    ranges = [(7 + 4 * a, 4 * n) for a, n in [(0, 3), (10, 400), (1000, 1), (1001, 700), (4990, 10)]]
    want = torch.cat([raw[a - 7:a - 7 + n] for a, n in ranges]).view(torch.int32)
    r = ckpt._StagedReader(torch.device("cpu"), chunk=999)  # ranges straddle buffers, buffers alternate
    got = r.read_ranges(f, ranges, torch.int32, (want.numel(),))
    assert torch.equal(got, want) and r.bytes_read == sum(n for _, n in ranges)
    with pytest.raises(ckpt.CheckpointError, match="unexpected end of file"):
        r.read_ranges(f, [(7, 8), (7 + 4 * 4999, 8)], torch.int32, (4,))
    r.close()


# ---------------------------------------------------------------------------------------- vocab-parallel lm_head
@pytest.mark.parametrize("name", ["mistral", "hf", "fp8"])
def test_vocab_parallel_lm_head_slices(good, name, monkeypatch):
    """PIXTRAL_RT_TP_LM_HEAD=vocab (the default): output.weight (the lm_head) is split by rows like a
    column-parallel linear: each rank reads and holds vocab / world rows of it, and the rows concatenate to
    the full matrix; the embedding table stays whole. Unknown modes and an indivisible vocabulary are
    errors."""
    from pixtral_rt.sharding import lm_head_mode
    monkeypatch.delenv("PIXTRAL_RT_TP_LM_HEAD", raising=False)
    assert lm_head_mode() == "vocab" and shard_rule("output.weight") == 0            # the default
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", "replicated")
    assert lm_head_mode() == "replicated" and shard_rule("output.weight") is None
    plan = plan_checkpoint(good[name])
    full = load(good[name])
    replicated_bytes = plan.shard_bytes(0, WORLD)
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", "vocab")
    assert shard_rule("output.weight") == 0 and shard_rule("tok_embeddings.weight") is None
    out = full["output.weight"]
    parts = []
    for r in range(WORLD):
        stats: dict = {}
        sd = load_state_dict(plan, progress=False, shard=(r, WORLD), stats=stats)
        parts.append(sd["output.weight"])
        assert sd["output.weight"].shape == (ARGS.text.vocab_size // WORLD, ARGS.text.dim)
        assert same(sd["tok_embeddings.weight"], full["tok_embeddings.weight"])
        # half of the lm_head's bytes fewer than with it replicated
        assert stats["bytes_read"] == plan.shard_bytes(r, WORLD) == replicated_bytes - out.nbytes // WORLD
    assert torch.equal(torch.cat(parts), out)
    check_divisible(ARGS, WORLD)
    with pytest.raises(ValueError, match="vocabulary \\(513\\) must divide evenly"):
        check_divisible(dataclasses.replace(ARGS.text, vocab_size=513), WORLD)
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", "rows")
    with pytest.raises(ValueError, match="PIXTRAL_RT_TP_LM_HEAD='rows': choose one of replicated, vocab"):
        shard_rule("output.weight")
