"""The quantised engines end to end on the CPU (tiny model, fp32), one test body for both schemes: the serving
engine (paged reference model with Fp8Linear / Int4Linear) gives exactly the tokens of the scheme's reference math
(PixtralModel.generate; FP8: prompt forwards quantise activations per token, decode steps do not; int4:
W = q * s dequantised exactly), for 0, 1 and 3 images; a checkpoint written by the project's writer and a bf16
checkpoint quantised at load give the same tokens; the load message and --json say which weights are quantised;
the --random-weights model; the CLI refuses an unknown scheme. int4's own refusals and --help:
test_engine_int4.py."""
import json
import subprocess
import sys

import pytest
import torch

from pixtral_rt.checkpoint import load_reference_model
from pixtral_rt.engine import Engine
from pixtral_rt.sampling import SamplingParams
from tests.helpers import small_image_messages as messages
from tests.quantized_helpers import REFERENCE_LINEAR, SCHEMES, write_engine_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """bf16 (Mistral layout), fp8, int4: the tiny() random model of seed 3."""
    return write_engine_checkpoints(tmp_path_factory.mktemp("quantized"))


@pytest.mark.parametrize("n_images", [0, 1, 3])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_token_identical_to_reference(ckpts, scheme, n_images):
    ref, _ = load_reference_model(ckpts / scheme, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, REFERENCE_LINEAR[scheme]) for m in ref.modules()) == 7 * ref.args.n_layers
    eng = Engine.load(ckpts / scheme, device="cpu", progress=False)                 # over the serving engine
    assert eng.info["quantization"] == scheme and scheme in eng.info["precision"]
    req = eng.encode(messages(n_images, n_images), SamplingParams(max_tokens=12))
    assert req.tokens.count(ref.pixtral_args.vision.image_token_id) > 0 or n_images == 0
    want = ref.generate(req.tokens, [im.float() for im in req.images], max_new_tokens=12, eos_id=None)
    got = eng.generate(messages(n_images, n_images), SamplingParams(max_tokens=12))
    assert got.token_ids == want[:len(got.token_ids)] and len(got.token_ids) >= 1
    eng.shutdown()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_at_load_equals_checkpoint(ckpts, scheme):
    a = Engine.load(ckpts / scheme, device="cpu", progress=False)
    b = Engine.load(ckpts / "bf16", device="cpu", progress=False, quantization=scheme)
    c = Engine.load(ckpts / "bf16", device="cpu", progress=False)
    m = messages(1, 7)
    p = SamplingParams(max_tokens=10)
    ra, rb = (e.generate(m, p) for e in (a, b))
    assert ra.token_ids == rb.token_ids
    assert b.info["quantization"] == scheme and c.info["quantization"] is None
    toks = torch.tensor(a.encode(messages(0, 1), p).tokens)
    for e in (a, b, c):
        e.shutdown()
    # the two quantised models hold the same bytes, and quantisation really changes the logits of the bf16 model
    written, _ = load_reference_model(ckpts / scheme)
    at_load, _ = load_reference_model(ckpts / "bf16", quantization=scheme)
    bf, _ = load_reference_model(ckpts / "bf16")
    with torch.no_grad():
        lw, la, lb = (x.forward_tokens(toks) for x in (written, at_load, bf))
    assert torch.equal(lw, la)
    assert (lw - lb).abs().max() > 1e-3 * lb.abs().max()


# scheme -> (in --json's precision, in the load message on stderr)
CLI_SAYS = {"fp8": ("e4m3", "fp8 e4m3 decoder linears"), "int4": ("one scale per 128 inputs", "int4 decoder linears")}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cli_json_says_quantization(ckpts, scheme):
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"), "--device",
                          "cpu", "--quantization", scheme, "--prompt", "hi", "--max-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    precision, load_message = CLI_SAYS[scheme]
    assert res["quantization"] == scheme and precision in res["precision"]
    assert load_message in out.stderr


def test_cli_refuses_unknown_quantization_and_random_with_model(ckpts):
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--quantization", "nf4", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nf4" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"),
                          "--random-weights", "tiny", "--device", "cpu", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not both" in out.stderr


@pytest.mark.parametrize("scheme", SCHEMES)
def test_random_weights_preset_on_device(scheme):
    """--random-weights tiny --quantization <scheme> draws the same model as the writer of that seed (seed 0), here
    on the CPU."""
    e = Engine.load(random_weights="tiny", device="cpu", progress=False, quantization=scheme)
    assert e.info["random_weights"] and e.info["quantization"] == scheme
    assert len(e.generate(messages(1, 2), SamplingParams(max_tokens=4)).token_ids) >= 1
    e.shutdown()
