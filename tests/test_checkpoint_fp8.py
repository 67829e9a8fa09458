"""FP8 checkpoints in the compressed-tensors layout (pixtral-12b-FP8-dynamic): writer -> loader round trip, the
file layout, and one named error per malformed variant, raised while planning, before a byte of weight data is
read. What int4 shares (load-time quantisation, key subsets, the on-device random model, the writer, fused groups):
test_checkpoint_quantized.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pixtral_rt import checkpoint as ckpt
from pixtral_rt import fp8
from pixtral_rt.checkpoint import (CheckpointError, hf_to_mistral_key, load_state_dict, mistral_to_hf_key,
                                   plan_checkpoint, read_safetensors_header)
from pixtral_rt.config import ConfigError
from pixtral_rt.quantization_config import QuantizationConfig
from pixtral_rt.random_weights import random_state_dict
from tests.quantized_helpers import (ARGS, OUT_Q, Q0, SEED, assert_ignores_as_package, assert_planning_refuses,
                                     assert_same_dict, as_bits, copy, dense_layer1_mlp, edit_config,
                                     expected_state_dict, rewrite, set_, write_good_checkpoints)
from tests.quantized_helpers import no_weight_reads  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """fp8, fp8-legacy-sharded, bf16-hf, bf16-mistral: the random model of SEED["fp8"]."""
    return write_good_checkpoints(tmp_path_factory.mktemp("fp8"), "fp8")


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("staged", [False, True], ids=["mmap", "staged-reads"])
@pytest.mark.parametrize("name", ["fp8", "fp8-legacy-sharded"])
def test_fp8_checkpoint_loads_as_quantised_bf16_model(good, name, staged):
    plan = plan_checkpoint(good[name])
    assert plan.quantization is not None and plan.format == "hf"
    if "sharded" in name:
        assert len(plan.files) > 1
    sd = load_state_dict(plan, dtype=torch.float32, progress=False, staged=staged)
    assert_same_dict(sd, expected_state_dict("fp8", torch.float32))
    n_linears = 7 * ARGS.text.n_layers
    assert sum(t.dtype == fp8.FP8_DTYPE for t in sd.values()) == n_linears
    assert sd["layers.0.attention.wq.weight_scale"].shape == (OUT_Q, 1)
    assert sd["layers.0.attention.wq.weight_scale"].dtype == torch.float32
    assert sd["vision_encoder.transformer.layers.0.attention.wq.weight"].dtype == torch.float32  # unquantised
    assert f"{n_linears} of {n_linears} decoder linears FP8" in plan.describe()


def test_written_fp8_file_layout(good):
    """HF names, F8_E4M3 [out, in] + F32 [out, 1] scales, q/k rows (and their scales) permuted as HF does."""
    header = read_safetensors_header(good["fp8"] / "model.safetensors")
    assert header[f"{Q0}.weight"]["dtype"] == "F8_E4M3"
    assert header[f"{Q0}.weight_scale"] == {**header[f"{Q0}.weight_scale"], "dtype": "F32", "shape": [OUT_Q, 1]}
    assert header["lm_head.weight"]["dtype"] == "BF16"
    assert header["model.vision_tower.transformer.layers.0.attention.q_proj.weight"]["dtype"] == "BF16"
    raw = load_file(str(good["fp8"] / "model.safetensors"))
    w8, s = fp8.quantize_weight(random_state_dict(ARGS, seed=SEED["fp8"])["layers.0.attention.wq.weight"])
    assert torch.equal(as_bits(raw[f"{Q0}.weight"]), as_bits(ckpt.permute_for_hf(w8, ARGS.text.n_heads)))
    assert torch.equal(raw[f"{Q0}.weight_scale"], ckpt.permute_for_hf(s, ARGS.text.n_heads))
    legacy = json.loads((good["fp8-legacy-sharded"] / "config.json").read_text())["quantization_config"]
    assert legacy["ignore"] == ["language_model.lm_head", "re:multi_modal_projector.*", "re:vision_tower.*"]
    new = json.loads((good["fp8"] / "config.json").read_text())["quantization_config"]
    assert new["ignore"] == ["lm_head", "re:model.multi_modal_projector.*", "re:model.vision_tower.*"]


def test_quantization_argument(good):
    plan = plan_checkpoint(good["fp8"])
    assert_same_dict(load_state_dict(plan, progress=False, quantization="fp8"), load_state_dict(plan, progress=False))
    with pytest.raises(ValueError, match=r"unknown quantization 'int8'.*fp8"):
        load_state_dict(plan, progress=False, quantization="int8")


def test_weight_scale_key_maps():
    for legacy, hf in [(False, f"{Q0}.weight_scale"),
                       (True, "language_model.model.layers.0.self_attn.q_proj.weight_scale")]:
        assert mistral_to_hf_key("layers.0.attention.wq.weight_scale", legacy) == hf
        assert hf_to_mistral_key(hf) == "layers.0.attention.wq.weight_scale"
    assert hf_to_mistral_key("model.language_model.layers.3.mlp.up_proj.weight_scale") == \
        "layers.3.feed_forward.w3.weight_scale"


# ---------------------------------------------------------------------------------------- malformed
F8 = torch.zeros(OUT_Q, ARGS.text.dim).to(fp8.FP8_DTYPE)
TENSOR_EDITS = {
    "missing-scale": (lambda sd: sd.pop(f"{Q0}.weight_scale"),
                      rf"missing weight_scale for {Q0}\.weight in .*model\.safetensors"),
    "scale-per-tensor": (set_(f"{Q0}.weight_scale", torch.ones(1)),
                         rf"'{Q0}\.weight_scale' has shape \[1\]; expected \[{OUT_Q}, 1\] \(one scale per output"),
    "scale-flat": (set_(f"{Q0}.weight_scale", torch.ones(OUT_Q)), rf"has shape \[{OUT_Q}\]; expected \[{OUT_Q}, 1\]"),
    "scale-int": (set_(f"{Q0}.weight_scale", torch.ones(OUT_Q, 1, dtype=torch.int32)),
                  r"weight_scale' has dtype I32; expected BF16, F16 or F32"),
    "input-scale": (set_(f"{Q0}.input_scale", torch.ones(1)), rf"'{Q0}\.input_scale'.*static activation scale"),
    "zero-point": (set_(f"{Q0}.weight_zero_point", torch.zeros(OUT_Q, 1)), r"weight_zero_point.*zero point"),
    "g-idx": (set_(f"{Q0}.weight_g_idx", torch.zeros(ARGS.text.dim, dtype=torch.int32)), r"weight_g_idx.*GPTQ"),
    "packed": (set_(f"{Q0}.weight_packed", torch.zeros(OUT_Q, 32, dtype=torch.int32)),
               r"weight_packed' \(I32 .*packed integer weights"),
    "int8-weight": (set_(f"{Q0}.weight", torch.zeros(OUT_Q, ARGS.text.dim, dtype=torch.int8)),
                    rf"'{Q0}\.weight' has dtype I8; expected F8_E4M3"),
    "bf16-weight-not-ignored": (set_(f"{Q0}.weight", torch.zeros(OUT_Q, ARGS.text.dim, dtype=torch.bfloat16)),
                                rf"has dtype BF16; expected F8_E4M3.*ignore list does not name '{Q0}'"),
    "fp8-lm-head": (set_("lm_head.weight", torch.zeros(512, ARGS.text.dim).to(fp8.FP8_DTYPE)),
                    r"'lm_head\.weight' has dtype F8_E4M3 but FP8 is read only for the text decoder"),
    "scale-of-vision": (set_("model.vision_tower.transformer.layers.0.attention.q_proj.weight_scale",
                             torch.ones(128, 1)),
                        r"weight scale of a layer this runtime keeps unquantised"),
    "int8-norm": (set_("model.language_model.norm.weight", torch.ones(ARGS.text.dim, dtype=torch.int8)),
                  r"'model\.language_model\.norm\.weight' has dtype I8 \(integer"),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_malformed_fp8_tensors(tmp_path, good, case, no_weight_reads):
    edit, pattern = TENSOR_EDITS[case]
    assert_planning_refuses(good["fp8"], tmp_path, pattern, tensors=edit)


def test_fp8_tensor_in_unquantised_checkpoints(tmp_path, good, no_weight_reads):
    d = copy(good["bf16-hf"], tmp_path)
    rewrite(d / "model.safetensors", set_(f"{Q0}.weight", F8))
    with pytest.raises(CheckpointError, match=rf"'{Q0}\.weight' has dtype F8_E4M3 but config\.json has no "
                                              r"quantization_config"):
        plan_checkpoint(d)
    rewrite(d / "model.safetensors", set_(f"{Q0}.weight_scale", torch.ones(OUT_Q, 1)))
    with pytest.raises(CheckpointError, match=r"weight_scale' is a weight scale but config\.json has no"):
        plan_checkpoint(d)
    m = copy(good["bf16-mistral"], tmp_path / "m")
    rewrite(m / "consolidated.safetensors", set_("layers.0.attention.wq.weight", F8))
    with pytest.raises(CheckpointError, match=r"params\.json has no quantization_config: FP8 and int4 checkpoints "
                                              r"are read in the HF compressed-tensors layout"):
        plan_checkpoint(m)


def test_mistral_params_with_quantization_block(tmp_path, good, no_weight_reads):
    d = copy(good["bf16-mistral"], tmp_path)
    p = json.loads((d / "params.json").read_text())
    p["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(CheckpointError, match=r"params\.json: has a 'quantization' block.*FP8 and int4 "
                                              r"checkpoints are read in the HF compressed-tensors layout"):
        plan_checkpoint(d)


def test_ignored_linears_load_unquantised(tmp_path, good):
    d = copy(good["fp8"], tmp_path)
    edit_config(d, lambda q: q["ignore"].append(r"re:.*layers\.1\.mlp\."))
    rewrite(d / "model.safetensors", dense_layer1_mlp(["gate_proj", "up_proj", "down_proj"], "fp8"))
    plan = plan_checkpoint(d)
    assert "11 of 14 decoder linears FP8" in plan.describe()
    sd = load_state_dict(plan, dtype=torch.float32, progress=False)
    assert sd["layers.1.feed_forward.w1.weight"].dtype == torch.float32
    assert "layers.1.feed_forward.w1.weight_scale" not in sd
    assert sd["layers.1.attention.wq.weight"].dtype == fp8.FP8_DTYPE
    # the ignore list names a linear that is F8 in the file
    edit_config(d, lambda q: q["ignore"].append("re:.*layers\\.0\\.self_attn\\.q_proj"))
    with pytest.raises(CheckpointError, match=rf"'{Q0}\.weight' has dtype F8_E4M3 but .*ignores this linear"):
        plan_checkpoint(d)


def _group(q):
    return q["config_groups"]["group_0"]


CONFIG_EDITS = {
    "quant-method-fp8": (lambda q: q.update(quant_method="fp8"), r"quant_method is 'fp8'"),
    "gptq": (lambda q: q.update(quant_method="gptq"), r"quant_method is 'gptq': GPTQ"),
    "awq": (lambda q: q.update(quant_method="awq"), r"quant_method is 'awq'"),
    "bitsandbytes": (lambda q: q.update(quant_method="bitsandbytes"), r"quant_method is 'bitsandbytes'"),
    "int-quantized": (lambda q: q.update(format="int-quantized"), r"format is 'int-quantized': int8"),
    # pack-quantized is int4's format: the FP8 group's float weights are then refused by the int4 checks
    "pack-quantized": (lambda q: q.update(format="pack-quantized"),
                       r"weights\.type is 'float': format 'pack-quantized' holds integer weights"),
    "naive-quantized": (lambda q: q.update(format="naive-quantized"), r"format is 'naive-quantized'"),
    "not-compressed": (lambda q: q.update(quantization_status="frozen"), r"quantization_status is 'frozen'"),
    "block": (lambda q: _group(q)["weights"].update(strategy="block", block_structure=[128, 128]),
              r"weights\.strategy is 'block': block-wise weight scales are not supported"),
    "group": (lambda q: _group(q)["weights"].update(strategy="group", group_size=128),
              r"weights\.strategy is 'group': group-wise"),
    "tensor": (lambda q: _group(q)["weights"].update(strategy="tensor"), r"weights\.strategy is 'tensor': per-tensor"),
    "inferred-tensor": (lambda q: _group(q)["weights"].update(strategy=None),
                        r"weights\.strategy is None: per-tensor"),
    "int8": (lambda q: _group(q)["weights"].update(type="int"), r"weights\.type is 'int': integer"),
    "num-bits-4": (lambda q: _group(q)["weights"].update(num_bits=4), r"weights\.num_bits is 4"),
    "asymmetric": (lambda q: _group(q)["weights"].update(symmetric=False), r"weights\.symmetric is False: asymmetric"),
    "static-activations": (lambda q: _group(q)["input_activations"].update(dynamic=False, strategy="tensor"),
                           r"input_activations\.dynamic is False: static activation scales"),
    "weight-only": (lambda q: _group(q).update(input_activations=None),
                    r"input_activations is None: weight-only FP8"),
    "activation-tensor": (lambda q: _group(q)["input_activations"].update(strategy="tensor"),
                          r"input_activations\.strategy is 'tensor': only per-token"),
    "int8-activations": (lambda q: _group(q)["input_activations"].update(type="int"),
                         r"input_activations\.type is 'int'"),
    "output-activations": (lambda q: _group(q).update(output_activations=dict(_group(q)["input_activations"])),
                           r"output_activations is \{.*\}: quantised outputs"),
    "kv-cache": (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}),
                 r"kv_cache_scheme is \{.*\}: a quantised KV cache"),
    "two-groups": (lambda q: q["config_groups"].update(group_1=dict(_group(q))),
                   r"config_groups is \['group_0', 'group_1'\]: expected exactly one config group, found 2"),
    "targets": (lambda q: _group(q).update(targets=["re:.*self_attn.*"]), r"targets is \['re:\.\*self_attn\.\*'\]"),
    "transform": (lambda q: q.update(transform_config={"config_groups": {"u": {"type": "hadamard"}}}),
                  r"transform_config is .*rotated"),
    "sparse": (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), r"sparsity_config .*sparse"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_unsupported_quantization_config(tmp_path, good, case, no_weight_reads):
    edit, pattern = CONFIG_EDITS[case]
    prefix = r"config\.json: quantization_config\.(config_groups\.group_0\.)?"  # file, then the field
    e = assert_planning_refuses(good["fp8"], tmp_path, prefix + pattern, config=edit)
    assert "supported are two compressed-tensors schemes" in str(e)


# ---------------------------------------------------------------------------------------- the config itself
def test_quantization_config_roundtrip_and_variants():
    q = QuantizationConfig.pixtral(legacy_hf_keys=True)
    assert QuantizationConfig.from_hf(q.to_hf(), "config.json") == q
    # as llm-compressor writes it: extra fields, upper-case type, channel inferred from group_size -1, preset form
    d = q.to_hf()
    d.update(version="0.9.1", global_compression_ratio=1.5)
    _group(d)["weights"].update(type="FLOAT", strategy=None, group_size=-1, observer="minmax", observer_kwargs={},
                                actorder=None, block_structure=None)
    assert QuantizationConfig.from_hf(d, "config.json") == q
    d["config_groups"] = {"FP8_DYNAMIC": ["Linear"]}
    assert QuantizationConfig.from_hf(d, "config.json") == q
    with pytest.raises(ConfigError, match=r"x/config\.json: quantization_config\.ignore is 're:\(': not a valid"):
        QuantizationConfig.from_hf({**q.to_hf(), "ignore": ["re:("]}, "x/config.json")


def test_ignore_matching_rules():
    q = QuantizationConfig(("language_model.lm_head", "re:vision_tower.*", "re:.*mlp\\.down_proj$"))
    assert q.ignores("language_model.lm_head")
    assert not q.ignores("language_model.lm_head.weight")  # module names, not parameter names
    assert not q.ignores("model.language_model.lm_head")  # exact names match exactly
    assert q.ignores("vision_tower.transformer.layers.0.attention.q_proj")
    assert not q.ignores("model.vision_tower.transformer.layers.0.attention.q_proj")  # re.match: anchored at start
    assert q.ignores("language_model.model.layers.3.mlp.down_proj")
    # the loader checks both HF layouts of a weight: an ignore list written with the other layout's names
    assert ckpt.is_ignored(QuantizationConfig(("re:language_model.model.layers.1.mlp.*",)),
                           "layers.1.feed_forward.w1.weight")


def test_matches_compressed_tensors_package(good):
    ct = pytest.importorskip("compressed_tensors", reason="package compressed-tensors is not installed "
                                                          "(pip install compressed-tensors, in the test extra)")
    for name in ("fp8", "fp8-legacy-sharded"):
        raw = json.loads((good[name] / "config.json").read_text())["quantization_config"]
        cfg = ct.QuantizationConfig.model_validate(raw)
        assert cfg.quant_method == "compressed-tensors" and cfg.format == "float-quantized"
        assert cfg.quantization_status == "compressed" and cfg.kv_cache_scheme is None
        (scheme,) = cfg.config_groups.values()
        w, x = scheme.weights, scheme.input_activations
        assert scheme.targets == ["Linear"] and scheme.output_activations is None
        assert (w.type, w.num_bits, w.strategy, w.symmetric, w.dynamic) == ("float", 8, "channel", True, False)
        assert (x.type, x.num_bits, x.strategy, x.symmetric, x.dynamic) == ("float", 8, "token", True, True)
        ours = assert_ignores_as_package(good[name], raw, cfg)  # our ignore matching == the package's
        assert ours.ignores("lm_head" if name == "fp8" else "language_model.lm_head")
