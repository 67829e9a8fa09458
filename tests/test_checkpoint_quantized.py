"""Quantised checkpoints, one test body for both schemes (FP8 in the compressed-tensors float-quantized layout,
int4 W4A16 in pack-quantized): load-time quantisation of a bf16 checkpoint equals the written one, a key subset
brings its quantised tensors, the on-device random model equals the written checkpoint, the writer's CLI and its
refusals, and fused linears that mix a scheme with bf16 are refused. Each scheme draws its own random model
(quantized_helpers.SEED). A scheme's own layout, malformed variants and config: test_checkpoint_fp8.py,
test_checkpoint_int4.py."""
from __future__ import annotations

import pytest
import torch

from pixtral_rt.checkpoint import CheckpointError, load_state_dict, plan_checkpoint
from pixtral_rt.random_weights import (main as random_weights_main, random_state_dict_on_device,
                                       write_random_checkpoint)
from tests.quantized_helpers import (ARGS, DATA_DTYPE, SCHEMES, SEED, as_bits, assert_same_dict, copy,
                                     dense_layer1_mlp, edit_config, expected_state_dict, quantized_keys, rewrite,
                                     write_good_checkpoints)
from tests.quantized_helpers import no_weight_reads  # noqa: F401 (a fixture)


@pytest.fixture(scope="module", params=SCHEMES)
def scheme(request):
    return request.param


@pytest.fixture(scope="module")
def good(tmp_path_factory, scheme):
    return write_good_checkpoints(tmp_path_factory.mktemp(scheme), scheme)


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("staged", [False, True], ids=["mmap", "staged-reads"])
@pytest.mark.parametrize("src", ["bf16-hf", "bf16-mistral"])
def test_load_time_quantisation_equals_checkpoint(good, scheme, src, staged):
    want = load_state_dict(plan_checkpoint(good[scheme]), dtype=torch.bfloat16, progress=False)
    got = load_state_dict(plan_checkpoint(good[src]), dtype=torch.bfloat16, progress=False, staged=staged,
                          quantization=scheme)
    assert_same_dict(got, want)


@pytest.mark.parametrize("at_load", [False, True], ids=["checkpoint", "bf16-quantised-at-load"])
def test_keys_subset_brings_scales_and_transform_sees_them(good, scheme, at_load):
    src, quantization = ("bf16-hf", scheme) if at_load else (scheme, None)
    seen = []

    def transform(k, t):
        seen.append((k, t.dtype))
        return t

    wk = "layers.1.attention.wk.weight"
    sd = load_state_dict(plan_checkpoint(good[src]), keys=[wk, "norm.weight"], progress=False, transform=transform,
                         quantization=quantization)
    data, scale = quantized_keys(wk, scheme)      # fp8: the F8 weight itself + its scale; int4: weight_packed + scale
    assert set(sd) == {data, scale, "norm.weight"}
    assert dict(seen) == {data: DATA_DTYPE[scheme], "norm.weight": torch.bfloat16, scale: torch.float32}
    want = expected_state_dict(scheme, torch.bfloat16)
    assert torch.equal(as_bits(sd[data]), as_bits(want[data]))


@pytest.mark.parametrize("quantised", [False, True], ids=["bf16", "quantised"])
def test_random_state_dict_on_device_equals_written_checkpoint(good, scheme, quantised):
    name, quantization = (scheme, scheme) if quantised else ("bf16-hf", None)
    want = load_state_dict(plan_checkpoint(good[name]), dtype=torch.float32, progress=False)
    got = random_state_dict_on_device(ARGS, seed=SEED[scheme], device="cpu", dtype=torch.float32,
                                      quantization=quantization, progress=False)
    assert_same_dict(got, want)


# ---------------------------------------------------------------------------------------- writer
MISTRAL_REFUSAL = {"fp8": r"HF compressed-tensors layout.*fmt='hf'", "int4": r"pack-quantized layout.*fmt='hf'"}


def test_writer_refuses_quantised_mistral_format(tmp_path, scheme):
    with pytest.raises(ValueError, match=MISTRAL_REFUSAL[scheme]):
        write_random_checkpoint(tmp_path / "m", ARGS, "mistral", quantization=scheme)
    assert not any((tmp_path / "m").glob("*"))  # refused before writing anything
    with pytest.raises(SystemExit):
        random_weights_main([str(tmp_path / "cli"), "--format", "mistral", "--quantization", scheme])


def test_writer_refuses_unknown_quantization(tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization 'fp4'"):
        write_random_checkpoint(tmp_path / "m", ARGS, "hf", quantization="fp4")
    assert not any((tmp_path / "m").glob("*"))  # refused before writing anything


def test_cli_writes_quantised(tmp_path, capsys, scheme):
    assert random_weights_main([str(tmp_path / "c"), "--format", "hf", "--quantization", scheme]) == 0
    assert scheme.upper() in capsys.readouterr().out
    plan = plan_checkpoint(tmp_path / "c")
    assert plan.quantization.scheme == scheme and not list((tmp_path / "c").glob("*.tmp"))


# ---------------------------------------------------------------------------------------- malformed
def test_fused_group_must_not_mix_quantised_and_bf16(tmp_path, good, scheme, no_weight_reads):
    d = copy(good[scheme], tmp_path)
    edit_config(d, lambda q: q["ignore"].append("re:.*layers\\.1\\.mlp\\.gate_proj"))
    rewrite(d / "model.safetensors", dense_layer1_mlp(["gate_proj"], scheme))
    with pytest.raises(CheckpointError, match=rf"layer 1 mixes {scheme.upper()} and unquantised linears that are "
                                              r"fused"):
        plan_checkpoint(d)
