"""The int4 (W4A16) engine end to end on the CPU (tiny model, fp32): the serving engine (paged reference model
with Int4Linear) gives exactly the tokens of the int4 reference math (PixtralModel.generate with Int4Linear:
W = q * s dequantised exactly), for 0, 1 and 3 images; an int4 checkpoint written by the project's writer, a
bf16 checkpoint quantised at load and the --random-weights model give the same tokens; the load message,
--json and --help say int4; int4 with tensor parallelism or another scheme's checkpoint is refused."""
import json
import subprocess
import sys

import pytest
import torch

from pixtral_rt.checkpoint import load_reference_model
from pixtral_rt.config import tiny
from pixtral_rt.engine import Engine
from pixtral_rt.random_weights import write_random_checkpoint
from pixtral_rt.reference.int4_linear import Int4Linear
from pixtral_rt.sampling import SamplingParams
from tests.helpers import small_image_messages as messages


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    args = tiny()
    write_random_checkpoint(root / "bf16", args, "mistral", seed=3)
    write_random_checkpoint(root / "int4", args, "hf", seed=3, quantization="int4")
    write_random_checkpoint(root / "fp8", args, "hf", seed=3, quantization="fp8")
    return root


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_int4_engine_token_identical_to_int4_reference(ckpts, n_images):
    ref, _ = load_reference_model(ckpts / "int4", device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, Int4Linear) for m in ref.modules()) == 7 * ref.args.n_layers
    eng = Engine.load(ckpts / "int4", device="cpu", progress=False)                 # over the serving engine
    assert eng.info["quantization"] == "int4" and "int4" in eng.info["precision"]
    req = eng.encode(messages(n_images, n_images), SamplingParams(max_tokens=12))
    assert req.tokens.count(ref.pixtral_args.vision.image_token_id) > 0 or n_images == 0
    want = ref.generate(req.tokens, [im.float() for im in req.images], max_new_tokens=12, eos_id=None)
    got = eng.generate(messages(n_images, n_images), SamplingParams(max_tokens=12))
    assert got.token_ids == want[:len(got.token_ids)] and len(got.token_ids) >= 1
    eng.shutdown()


def test_quantized_at_load_equals_int4_checkpoint(ckpts):
    a = Engine.load(ckpts / "int4", device="cpu", progress=False)
    b = Engine.load(ckpts / "bf16", device="cpu", progress=False, quantization="int4")
    m = messages(1, 7)
    p = SamplingParams(max_tokens=10)
    ra, rb = (e.generate(m, p) for e in (a, b))
    assert ra.token_ids == rb.token_ids
    assert b.info["quantization"] == "int4"
    toks = torch.tensor(a.encode(messages(0, 1), p).tokens)
    for e in (a, b):
        e.shutdown()
    # the two int4 models hold the same bytes, and int4 really changes the logits of the bf16 model
    i4, _ = load_reference_model(ckpts / "int4")
    q4, _ = load_reference_model(ckpts / "bf16", quantization="int4")
    bf, _ = load_reference_model(ckpts / "bf16")
    with torch.no_grad():
        li, lq, lb = (x.forward_tokens(toks) for x in (i4, q4, bf))
    assert torch.equal(li, lq)
    assert (li - lb).abs().max() > 1e-3 * lb.abs().max()


def test_int4_refusals(ckpts):
    with pytest.raises(ValueError, match=r"is an fp8 checkpoint.*--quantization int4 cannot convert it"):
        Engine.load(ckpts / "fp8", device="cpu", progress=False, quantization="int4")
    with pytest.raises(ValueError, match=r"is an int4 checkpoint.*--quantization fp8 cannot convert it"):
        Engine.load(ckpts / "int4", device="cpu", progress=False, quantization="fp8")
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"), "--device",
                          "cpu", "--quantization", "int4", "--tensor-parallel", "2", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--quantization int4 with --tensor-parallel is not supported" in out.stderr


def test_cli_json_and_help_say_int4(ckpts):
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"), "--device",
                          "cpu", "--quantization", "int4", "--prompt", "hi", "--max-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["quantization"] == "int4" and "one scale per 128 inputs" in res["precision"]
    assert "int4 decoder linears" in out.stderr
    for cmd in ("pixtral_rt.generate", "pixtral_rt.serve"):
        h = subprocess.run([sys.executable, "-m", cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert h.returncode == 0 and "{fp8,int4}" in h.stdout and "int4: 4-bit weights" in " ".join(h.stdout.split())


def test_random_weights_preset_on_device(ckpts):
    """--random-weights tiny --quantization int4 draws the int4 model of seed 0, here on the CPU."""
    e = Engine.load(random_weights="tiny", device="cpu", progress=False, quantization="int4")
    assert e.info["random_weights"] and e.info["quantization"] == "int4"
    assert len(e.generate(messages(1, 2), SamplingParams(max_tokens=4)).token_ids) >= 1
    e.shutdown()
