"""Int4 (W4A16) checkpoints in the compressed-tensors "pack-quantized" layout: writer -> loader round trip, the
file layout, the reference model, the compressed-tensors package's own config model and decompressor, and one
named error per malformed variant, raised while planning, before a byte of weight data is read (the only tensor
data planning reads is the 16 bytes of each weight_shape, checked against the config). What FP8 shares (load-time
quantisation, key subsets, the on-device random model, the writer, fused groups): test_checkpoint_quantized.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pixtral_rt import checkpoint as ckpt
from pixtral_rt import int4
from pixtral_rt.checkpoint import CheckpointError, load_state_dict, plan_checkpoint, read_safetensors_header
from pixtral_rt.config import ConfigError
from pixtral_rt.quantization_config import QuantizationConfig
from pixtral_rt.random_weights import random_state_dict, random_state_dict_on_device
from tests.quantized_helpers import (ARGS, OUT_Q, Q0, SEED, assert_ignores_as_package, assert_planning_refuses,
                                     assert_same_dict, copy, dense_layer1_mlp, edit_config, expected_state_dict,
                                     rewrite, set_, write_good_checkpoints)
from tests.quantized_helpers import no_weight_reads  # noqa: F401 (a fixture)

DIM = ARGS.text.dim                                     # 256: 32 words, 2 groups of 128
N_LIN = 7 * ARGS.text.n_layers


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """int4, int4-legacy-sharded, bf16-hf, bf16-mistral, fp8: the random model of SEED["int4"]."""
    return write_good_checkpoints(tmp_path_factory.mktemp("int4"), "int4", also=("fp8",))


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("staged", [False, True], ids=["mmap", "staged-reads"])
@pytest.mark.parametrize("name", ["int4", "int4-legacy-sharded"])
def test_int4_checkpoint_loads_as_quantised_bf16_model(good, name, staged):
    plan = plan_checkpoint(good[name])
    assert plan.quantization.scheme == "int4" and plan.quantization.group_size == 128
    if "sharded" in name:
        assert len(plan.files) > 1
    sd = load_state_dict(plan, dtype=torch.float32, progress=False, staged=staged)
    assert_same_dict(sd, expected_state_dict("int4", torch.float32))
    assert sum(k.endswith(".weight_packed") for k in sd) == N_LIN
    assert "layers.0.attention.wq.weight" not in sd and "layers.0.attention.wq.weight_shape" not in sd
    assert sd["layers.0.attention.wq.weight_packed"].shape == (OUT_Q, DIM // 8)
    assert sd["layers.0.attention.wq.weight_scale"].shape == (OUT_Q, DIM // 128)
    assert sd["layers.0.attention.wq.weight_scale"].dtype == torch.float32
    assert sd["vision_encoder.transformer.layers.0.attention.wq.weight"].dtype == torch.float32  # unquantised
    assert f"{N_LIN} of {N_LIN} decoder linears int4" in plan.describe()


def test_written_int4_file_layout(good):
    """HF names, I32 [out, in/8] + BF16 [out, in/128] + I64 weight_shape, q/k rows (and their scales) permuted as
    HF does; config.json with the pack-quantized W4A16 quantization_config."""
    header = read_safetensors_header(good["int4"] / "model.safetensors")
    assert f"{Q0}.weight" not in header
    assert {k: header[f"{Q0}.{k}"]["dtype"] for k in int4_params()} == {
        "weight_packed": "I32", "weight_scale": "BF16", "weight_shape": "I64"}
    assert header[f"{Q0}.weight_packed"]["shape"] == [OUT_Q, DIM // 8]
    assert header[f"{Q0}.weight_scale"]["shape"] == [OUT_Q, DIM // 128]
    assert header["lm_head.weight"]["dtype"] == "BF16"
    raw = load_file(str(good["int4"] / "model.safetensors"))
    packed, s = int4.quantize_and_pack(random_state_dict(ARGS, seed=SEED["int4"])["layers.0.attention.wq.weight"])
    assert torch.equal(raw[f"{Q0}.weight_packed"], ckpt.permute_for_hf(packed, ARGS.text.n_heads))
    assert torch.equal(raw[f"{Q0}.weight_scale"].float(), ckpt.permute_for_hf(s, ARGS.text.n_heads))
    assert raw[f"{Q0}.weight_shape"].tolist() == [OUT_Q, DIM]
    q = json.loads((good["int4"] / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head", "re:model.multi_modal_projector.*",
                                                               "re:model.vision_tower.*"]
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 128, True)


def int4_params():
    return ("weight_packed", "weight_scale", "weight_shape")


def test_quantization_argument(good):
    plan = plan_checkpoint(good["int4"])
    assert_same_dict(load_state_dict(plan, progress=False, quantization="int4"), load_state_dict(plan, progress=False))
    with pytest.raises(ValueError, match=r"holds int4 weights already.*quantization='fp8' cannot convert them"):
        load_state_dict(plan, progress=False, quantization="fp8")
    with pytest.raises(ValueError, match=r"holds fp8 weights already.*quantization='int4'"):
        load_state_dict(plan_checkpoint(good["fp8"]), progress=False, quantization="int4")
    with pytest.raises(ValueError, match=r"tensor parallelism \(shard=\) with int4 weights is not supported"):
        load_state_dict(plan, progress=False, shard=(0, 2))
    with pytest.raises(ValueError, match=r"tensor parallelism \(shard=\) with int4 weights is not supported"):
        load_state_dict(plan_checkpoint(good["bf16-hf"]), progress=False, shard=(0, 2), quantization="int4")


def test_random_state_dict_on_device_refuses_int4_shards():
    with pytest.raises(ValueError, match="int4 weights is not supported"):
        random_state_dict_on_device(ARGS, seed=SEED["int4"], device="cpu", quantization="int4", shard=(0, 2),
                                    progress=False)


def test_reference_model_runs_the_dequantised_weights(good):
    """The reference model of an int4 checkpoint equals a plain model holding W = q * s (exact math)."""
    from pixtral_rt.reference.int4_linear import Int4Linear
    from pixtral_rt.reference.model import PixtralModel
    m, _ = ckpt.load_reference_model(good["int4"])
    assert sum(isinstance(x, Int4Linear) for x in m.modules()) == N_LIN
    sd = load_state_dict(plan_checkpoint(good["int4"]), dtype=torch.float32, progress=False)
    dense = {}
    for k, t in sd.items():
        if k.endswith(".weight_packed"):
            base = k[:-len("_packed")]
            dense[base] = int4.dequantize(t, sd[int4.scale_key(base)])
        elif not (k.endswith(".weight_scale") and int4.packed_key(k[:-len("_scale")]) in sd):
            dense[k] = t
    plain = PixtralModel.from_state_dict(ARGS, dense)
    toks = torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m.forward_tokens(toks), plain.forward_tokens(toks)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.abs().max() > 0


# ---------------------------------------------------------------------------------------- malformed
def dense_q0(dtype):
    def edit(sd):
        for k in int4_params():
            sd.pop(f"{Q0}.{k}")
        sd[f"{Q0}.weight"] = torch.zeros(OUT_Q, DIM).to(dtype)
    return edit


I32 = dict(dtype=torch.int32)
TENSOR_EDITS = {
    "missing-scale": (lambda sd: sd.pop(f"{Q0}.weight_scale"),
                      rf"missing weight_scale for {Q0}\.weight_packed in .*model\.safetensors"),
    "missing-shape": (lambda sd: sd.pop(f"{Q0}.weight_shape"), rf"missing weight_shape for {Q0}\.weight_packed"),
    "missing-packed": (lambda sd: sd.pop(f"{Q0}.weight_packed"), rf"{Q0}\.weight_packed is missing"),
    "packed-int8": (set_(f"{Q0}.weight_packed", torch.zeros(OUT_Q, DIM // 8, dtype=torch.int8)),
                    rf"'{Q0}\.weight_packed' has dtype I8; expected I32"),
    "packed-narrow": (set_(f"{Q0}.weight_packed", torch.zeros(OUT_Q, DIM // 16, **I32)),
                      rf"'{Q0}\.weight_packed' has shape \[512, 16\]; expected \[512, 32\]"),
    "packed-unpacked": (set_(f"{Q0}.weight_packed", torch.zeros(OUT_Q, DIM, **I32)),
                        r"has shape \[512, 256\]; expected \[512, 32\] \(eight 4-bit values"),
    "scale-per-channel": (set_(f"{Q0}.weight_scale", torch.ones(OUT_Q, 1)),
                          rf"'{Q0}\.weight_scale' has shape \[512, 1\]; expected \[512, 2\] \(one scale per "
                          r"output row and group of 128"),
    "scale-int": (set_(f"{Q0}.weight_scale", torch.ones(OUT_Q, 2, **I32)),
                  r"weight_scale' has dtype I32; expected BF16, F16 or F32"),
    "shape-values": (set_(f"{Q0}.weight_shape", torch.tensor([OUT_Q, DIM - 1])),
                     rf"'{Q0}\.weight_shape' holds \[512, 255\]; expected \[512, 256\]"),
    "shape-int32-values": (set_(f"{Q0}.weight_shape", torch.tensor([DIM, OUT_Q], **I32)),
                           r"holds \[256, 512\]; expected \[512, 256\]"),
    "shape-float": (set_(f"{Q0}.weight_shape", torch.tensor([512.0, 256.0])),
                    r"weight_shape' is F32 \[2\]; expected an I64 \(or I32\) \[2\]"),
    "zero-point": (set_(f"{Q0}.weight_zero_point", torch.zeros(OUT_Q // 8, 2, **I32)),
                   r"weight_zero_point.*asymmetric int4 is not supported"),
    "g-idx": (set_(f"{Q0}.weight_g_idx", torch.zeros(DIM, **I32)), r"weight_g_idx.*GPTQ"),
    "input-scale": (set_(f"{Q0}.input_scale", torch.ones(1)), r"input_scale'.*static activation scale"),
    "dense-weight": (dense_q0(torch.bfloat16), rf"'{Q0}\.weight' is a dense BF16 weight but config\.json's "
                                               rf"quantization_config \(pack-quantized int4\) quantises this linear"),
    "fp8-weight": (dense_q0(torch.float8_e4m3fn), r"is a dense F8_E4M3 weight"),
    "packed-lm-head": (set_("lm_head.weight_packed", torch.zeros(512, DIM // 8, **I32)),
                       r"'lm_head\.weight_packed' is a packed int4 weight of a layer this runtime keeps unquantised"),
    "int4-norm": (set_("model.language_model.norm.weight", torch.ones(DIM, **I32)),
                  r"'model\.language_model\.norm\.weight' has dtype I32 \(integer"),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_malformed_int4_tensors(tmp_path, good, case, no_weight_reads):
    edit, pattern = TENSOR_EDITS[case]
    assert_planning_refuses(good["int4"], tmp_path, pattern, tensors=edit)


def test_packed_tensors_without_pack_quantized_config(tmp_path, good, no_weight_reads):
    for src in ("bf16-hf", "fp8"):
        d = copy(good[src], tmp_path / src)
        rewrite(d / "model.safetensors", set_(f"{Q0}.weight_packed", torch.zeros(OUT_Q, DIM // 8, **I32)))
        with pytest.raises(CheckpointError, match=r"weight_packed' \(I32 .*packed integer weights .*format "
                                                  r"'pack-quantized'"):
            plan_checkpoint(d)


def test_group_size_mismatch_between_config_and_tensors(tmp_path, good, no_weight_reads):
    d = copy(good["int4"], tmp_path)
    edit_config(d, lambda q: _weights(q).update(group_size=64))
    with pytest.raises(CheckpointError, match=r"weight_scale' has shape \[\d+, (\d+)\]; expected \[\d+, \d+\] "
                                              r"\(one scale per output row and group of 64 inputs"):
        plan_checkpoint(d)
    edit_config(d, lambda q: _weights(q).update(group_size=1024))    # 256 or 512 inputs: no groups of 1024
    with pytest.raises(CheckpointError, match=r"has (256|512) inputs, which do not split into groups of 1024 "
                                              r"\(config\.json's quantization_config group_size\)"):
        plan_checkpoint(d)


def test_ignored_linears_load_unquantised(tmp_path, good):
    d = copy(good["int4"], tmp_path)
    edit_config(d, lambda q: q["ignore"].append(r"re:.*layers\.1\.mlp\."))
    rewrite(d / "model.safetensors", dense_layer1_mlp(["gate_proj", "up_proj", "down_proj"], "int4"))
    plan = plan_checkpoint(d)
    assert f"{N_LIN - 3} of {N_LIN} decoder linears int4" in plan.describe()
    sd = load_state_dict(plan, dtype=torch.float32, progress=False)
    assert sd["layers.1.feed_forward.w1.weight"].dtype == torch.float32
    assert "layers.1.feed_forward.w1.weight_scale" not in sd and "layers.1.feed_forward.w1.weight_packed" not in sd
    assert sd["layers.1.attention.wq.weight_packed"].dtype == torch.int32
    # the ignore list names a linear that is int4 in the file
    edit_config(d, lambda q: q["ignore"].append("re:.*layers\\.0\\.self_attn\\.q_proj"))
    with pytest.raises(CheckpointError, match=rf"'{Q0}\.weight_\w+' is an int4 parameter but config\.json's "
                                              r"quantization_config ignores this linear"):
        plan_checkpoint(d)


def _group(q):
    return q["config_groups"]["group_0"]


def _weights(q):
    return _group(q)["weights"]


CONFIG_EDITS = {
    "asymmetric": (lambda q: _weights(q).update(symmetric=False),
                   r"weights\.symmetric is False: asymmetric int4 \(weight_zero_point tensors\) is not supported"),
    "actorder-group": (lambda q: _weights(q).update(actorder="group"),
                       r"weights\.actorder is 'group': activation reordering with a group index \(weight_g_idx\)"),
    "actorder-dynamic": (lambda q: _weights(q).update(actorder="dynamic"), r"weights\.actorder is 'dynamic'"),
    "actorder-true": (lambda q: _weights(q).update(actorder=True), r"weights\.actorder is True"),
    "int8": (lambda q: _weights(q).update(num_bits=8), r"weights\.num_bits is 8: only 4-bit"),
    "float": (lambda q: _weights(q).update(type="float"), r"weights\.type is 'float': format 'pack-quantized' holds"),
    "channel": (lambda q: _weights(q).update(strategy="channel", group_size=-1),
                r"weights\.strategy is 'channel': one scale per output channel is not supported with int4"),
    "inferred-tensor": (lambda q: _weights(q).update(strategy=None, group_size=None),
                        r"weights\.strategy is None: per-tensor"),
    "group-96": (lambda q: _weights(q).update(group_size=96), r"weights\.group_size is 96: expected a power of two"),
    "group-none": (lambda q: _weights(q).update(group_size=None), r"weights\.group_size is None"),
    "block": (lambda q: _weights(q).update(block_structure=[128, 128]), r"weights\.block_structure is \[128, 128\]"),
    "dynamic": (lambda q: _weights(q).update(dynamic=True), r"weights\.dynamic is True"),
    "scale-dtype": (lambda q: _weights(q).update(scale_dtype="torch.float8_e4m3fn"), r"weights\.scale_dtype is"),
    "w4a8": (lambda q: _group(q).update(input_activations={"num_bits": 8, "type": "int", "strategy": "token",
                                                           "dynamic": True}),
             r"input_activations is \{.*\}: int4 weights run with unquantised activations"),
    "output-activations": (lambda q: _group(q).update(output_activations={"num_bits": 8}),
                           r"output_activations is \{.*\}: quantised outputs"),
    "weight-less": (lambda q: _group(q).update(weights=None), r"weights is None: expected an object"),
    "group-format": (lambda q: _group(q).update(format="float-quantized"),
                     r"format is 'float-quantized': only 'pack-quantized' is supported"),
    "preset": (lambda q: q.update(config_groups={"W8A16": ["Linear"]}),
               r"config_groups\.W8A16 is \['Linear'\]: preset 'W8A16' is not supported with format 'pack-quantized'"),
    "not-compressed": (lambda q: q.update(quantization_status="frozen"), r"quantization_status is 'frozen'"),
    "kv-cache": (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), r"kv_cache_scheme is"),
    "two-groups": (lambda q: q["config_groups"].update(group_1=dict(_group(q))),
                   r"config_groups is \['group_0', 'group_1'\]: expected exactly one config group"),
    "targets": (lambda q: _group(q).update(targets=["re:.*mlp.*"]), r"targets is \['re:\.\*mlp\.\*'\]"),
    "nvfp4": (lambda q: q.update(format="nvfp4-pack-quantized"), r"format is 'nvfp4-pack-quantized': NVFP4"),
    "mixed": (lambda q: q.update(format="mixed-precision"), r"format is 'mixed-precision'"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_unsupported_int4_quantization_config(tmp_path, good, case, no_weight_reads):
    edit, pattern = CONFIG_EDITS[case]
    prefix = r"config\.json: quantization_config\.(config_groups\.(group_0|W8A16)\.)?"  # file, then the field
    e = assert_planning_refuses(good["int4"], tmp_path, prefix + pattern, config=edit)
    assert "W4A16 (format 'pack-quantized'" in str(e)


def test_int4_config_variants_accepted(tmp_path, good):
    q = QuantizationConfig.pixtral(legacy_hf_keys=False, scheme="int4")
    assert QuantizationConfig.from_hf(q.to_hf(), "config.json") == q
    d = q.to_hf()     # as llm-compressor writes it: extra fields, upper-case type, group inferred, actorder weight
    d.update(version="0.9.1", global_compression_ratio=3.1)
    _weights(d).update(type="INT", strategy=None, observer="minmax", observer_kwargs={}, actorder="weight",
                       block_structure=None)
    assert QuantizationConfig.from_hf(d, "config.json") == q
    d["config_groups"] = {"W4A16": ["Linear"]}
    assert QuantizationConfig.from_hf(d, "config.json") == q
    _weights_static = q.to_hf()
    _weights(_weights_static).update(actorder="static")
    assert QuantizationConfig.from_hf(_weights_static, "config.json") == q
    with pytest.raises(ConfigError, match=r"x/config\.json: quantization_config\.config_groups\.group_0\.weights"
                                          r"\.group_size is 8"):
        QuantizationConfig.from_hf({**d, "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": dict(_weights(q.to_hf()), group_size=8)}}}, "x/config.json")
    # a checkpoint whose config says actorder "weight" loads as the plain one (same format)
    c = copy(good["int4"], tmp_path)
    edit_config(c, lambda x: _weights(x).update(actorder="weight"))
    assert_same_dict(load_state_dict(plan_checkpoint(c), progress=False),
                     load_state_dict(plan_checkpoint(good["int4"]), progress=False))


def test_matches_compressed_tensors_package(good):
    ct = pytest.importorskip("compressed_tensors", reason="package compressed-tensors is not installed "
                                                          "(pip install compressed-tensors, in the test extra)")
    for name in ("int4", "int4-legacy-sharded"):
        raw = json.loads((good[name] / "config.json").read_text())["quantization_config"]
        cfg = ct.QuantizationConfig.model_validate(raw)        # extra="forbid": no field of ours it lacks
        assert cfg.quant_method == "compressed-tensors" and cfg.format == "pack-quantized"
        assert cfg.quantization_status == "compressed" and cfg.kv_cache_scheme is None
        (scheme,) = cfg.config_groups.values()
        w = scheme.weights
        assert scheme.targets == ["Linear"] and scheme.input_activations is None
        assert scheme.output_activations is None
        assert (w.type, w.num_bits, w.strategy, w.group_size, w.symmetric, w.dynamic, w.actorder) == \
            ("int", 4, "group", 128, True, False, None)
        # the package's compressor for this scheme names exactly the tensors the writer wrote
        from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
        assert set(PackedQuantizationCompressor.compression_param_names(scheme)) == set(int4_params())
        assert_ignores_as_package(good[name], raw, cfg)  # our ignore matching == the package's


def test_compressed_tensors_decompresses_our_file_to_our_weights(good):
    """The package's own decompressor turns a written linear back into our dequantised weight (it computes
    q * s in the scale's dtype, bf16: one rounding of our exact fp32 product)."""
    ct = pytest.importorskip("compressed_tensors", reason="package compressed-tensors is not installed")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    raw = load_file(str(good["int4"] / "model.safetensors"))
    cfg = ct.QuantizationConfig.model_validate(json.loads((good["int4"] / "config.json").read_text())
                                               ["quantization_config"])
    (scheme,) = cfg.config_groups.values()
    m = "model.language_model.layers.1.mlp.down_proj"
    local = {k: raw[f"{m}.{k}"] for k in int4_params()}
    dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    ours = int4.dequantize(local["weight_packed"], local["weight_scale"].float())
    assert dense.dtype == torch.bfloat16 and torch.equal(dense, ours.to(torch.bfloat16))
