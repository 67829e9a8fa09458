"""Every loader error gets its own message naming the file and tensor, raised before any weights load."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixtral_rt.checkpoint import (CheckpointError, detect_format, load_state_dict, plan_checkpoint,
                                   hf_to_mistral_key, mistral_to_hf_key, permute_for_hf, unpermute_from_hf)
from pixtral_rt.config import PIXTRAL_12B, PRESETS, PixtralArgs, tiny
from pixtral_rt.random_weights import random_state_dict, write_random_checkpoint

ARGS = tiny(vocab_size=512)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "mistral": write_random_checkpoint(root / "mistral", ARGS, "mistral", seed=1),
        "hf": write_random_checkpoint(root / "hf", ARGS, "hf", seed=1),
        "hf-sharded-legacy": write_random_checkpoint(root / "hf2", ARGS, "hf", seed=1, shard_bytes=1 << 20,
                                                     legacy_hf_keys=True),
        "mistral-sharded": write_random_checkpoint(root / "m2", ARGS, "mistral", seed=1, shard_bytes=1 << 20),
    }


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("staged", [False, True], ids=["mmap", "staged-reads"])
@pytest.mark.parametrize("name", ["mistral", "hf", "hf-sharded-legacy", "mistral-sharded"])
def test_all_layouts_load_the_same_weights(good, name, staged):
    plan = plan_checkpoint(good[name])
    assert plan.format == name.split("-")[0]
    assert plan.args.text == ARGS.text and plan.args.vision == ARGS.vision
    if "sharded" in name:
        assert len(plan.files) > 1
    sd = load_state_dict(plan, dtype=torch.float32, progress=False, staged=staged)
    want = {k: v.float() for k, v in random_state_dict(ARGS, seed=1).items()}  # written in bf16
    assert sd.keys() == want.keys()
    for k in want:
        assert torch.equal(sd[k], want[k]), k


def test_hf_key_maps_and_permutation_are_inverse():
    for k in random_state_dict(ARGS, seed=0):
        for legacy in (False, True):
            assert hf_to_mistral_key(mistral_to_hf_key(k, legacy)) == k
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_from_hf(permute_for_hf(w, 4), 4), w)
    assert not torch.equal(permute_for_hf(w, 4), w)


def test_detect_names_chosen_format_and_missing_pieces(tmp_path, good):
    assert detect_format(good["mistral"]) == "mistral"
    assert detect_format(good["hf"]) == "hf"
    with pytest.raises(CheckpointError, match="neither params.json"):
        detect_format(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        detect_format(tmp_path / "nope")
    d = copy(good["mistral"], tmp_path)
    (d / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no consolidated"):
        detect_format(d)
    assert "mistral format" in plan_checkpoint(good["mistral"]).describe()


def test_missing_shard_of_index(tmp_path, good):
    d = copy(good["hf-sharded-legacy"], tmp_path)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"absent.*{victim.name}"):
        plan_checkpoint(d)


def test_missing_shard_without_index(tmp_path, good):
    d = copy(good["mistral-sharded"], tmp_path)
    (d / "consolidated.safetensors.index.json").unlink()
    sorted(d.glob("consolidated-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) \[1\]"):
        plan_checkpoint(d)


def _rewrite(path: Path, edit):
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def test_missing_tensor(tmp_path, good):
    d = copy(good["mistral"], tmp_path)
    _rewrite(d / "consolidated.safetensors", lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.feed_forward\.w3\.weight"):
        plan_checkpoint(d)


def test_unexpected_tensor(tmp_path, good):
    d = copy(good["hf"], tmp_path)
    _rewrite(d / "model.safetensors", lambda sd: sd.__setitem__("model.extra_head.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra_head\.weight \(model\.safetensors\)"):
        plan_checkpoint(d)


def test_wrong_shape(tmp_path, good):
    d = copy(good["mistral"], tmp_path)
    _rewrite(d / "consolidated.safetensors",
             lambda sd: sd.__setitem__("norm.weight", torch.ones(ARGS.text.dim + 1, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: tensor 'norm\.weight' has shape \[257\]"):
        plan_checkpoint(d)


def test_wrong_dtype(tmp_path, good):
    d = copy(good["mistral"], tmp_path)
    _rewrite(d / "consolidated.safetensors",
             lambda sd: sd.__setitem__("norm.weight", torch.ones(ARGS.text.dim, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"'norm\.weight' has dtype I32"):
        plan_checkpoint(d)


def test_truncated_file(tmp_path, good):
    d = copy(good["mistral"], tmp_path)
    f = d / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: tensor .* truncated file"):
        plan_checkpoint(d)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\xff" * 64, b"<html>not found</html>" * 4],
                         ids=["empty", "tiny", "garbage-length", "html"])
def test_corrupt_file(tmp_path, good, content):
    d = copy(good["mistral"], tmp_path)
    (d / "consolidated.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: (truncated|corrupt)"):
        plan_checkpoint(d)


def test_bad_config(tmp_path, good):
    d = copy(good["mistral"], tmp_path)
    p = json.loads((d / "params.json").read_text())
    del p["vision_encoder"]
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(CheckpointError, match="no 'vision_encoder' block"):
        plan_checkpoint(d)
    (d / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read params.json"):
        plan_checkpoint(d)


def test_config_roundtrip_all_presets():
    for args in list(PRESETS.values()) + [tiny(), tiny(True)]:
        import tempfile
        with tempfile.TemporaryDirectory() as t:
            (Path(t) / "params.json").write_text(json.dumps(args.to_params_json()))
            (Path(t) / "config.json").write_text(json.dumps(args.to_hf_config()))
            a = PixtralArgs.from_params_json(Path(t) / "params.json")
            b = PixtralArgs.from_hf_config(Path(t) / "config.json")
        for got in (a, b):
            assert got.text == args.text and got.vision == args.vision, args.name
    assert PIXTRAL_12B.vision.head_dim == 64 and PRESETS["Pixtral-Large-Instruct-2411"].vision.head_dim == 88


def test_preset_first_n_layers():
    """"NAME:layers=N" (Pixtral-Large's real shapes on one GPU): the preset with N decoder layers, whose
    random draws are the full model's first N layers; a bad spec is an error naming it and the limit."""
    from pixtral_rt.config import preset
    large = PRESETS["Pixtral-Large-Instruct-2411"]
    cut = preset("Pixtral-Large-Instruct-2411:layers=4")
    assert cut.text.n_layers == 4 and cut.name == "Pixtral-Large-Instruct-2411:layers=4"
    assert dataclasses.replace(cut.text, n_layers=large.text.n_layers) == large.text and cut.vision == large.vision
    full, one = random_state_dict(tiny(), seed=5), random_state_dict(preset("tiny:layers=1"), seed=5)
    assert set(one) == {k for k in full if not k.startswith("layers.1.")}
    assert all(torch.equal(one[k], full[k]) for k in one)
    for bad in ("Pixtral-Large-Instruct-2411:layers=0", "Pixtral-Large-Instruct-2411:layers=89",
                "Pixtral-12B-2409:heads=4", "tiny:layers=x"):
        with pytest.raises(ValueError, match="layers=N with 1 <= N"):
            preset(bad)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope:layers=2")


def test_staged_reader_chunks_and_truncation(tmp_path):
    from pixtral_rt.checkpoint import CheckpointError, _StagedReader
    data = torch.randn(1000, 37)
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x" * 13 + data.numpy().tobytes())
    r = _StagedReader(torch.device("cpu"), chunk=1000)  # many chunks, both buffers in turn
    got = r.read(f, 13, data.numel() * 4, torch.float32, (1000, 37))
    assert torch.equal(got, data)
    with pytest.raises(CheckpointError, match="unexpected end of file"):
        r.read(f, 13 + 4 * 37 * 999, 4 * 37 * 2, torch.float32, (2, 37))
    r.close()
