"""The FP8 engine end to end on the CPU (tiny model, fp32): the serving engine (paged reference model with
FP8 linears) gives exactly the tokens of the FP8 reference math
(PixtralModel.generate with Fp8Linear: prompt forwards quantise activations per token, decode steps do not),
for 0, 1 and 3 images; an FP8 checkpoint written by the project's writer and a bf16 checkpoint quantised at
load give the same tokens; the load message and --json say which weights are FP8."""
import json
import subprocess
import sys

import pytest
import torch

from pixtral_rt.checkpoint import load_reference_model
from pixtral_rt.config import tiny
from pixtral_rt.engine import Engine
from pixtral_rt.random_weights import write_random_checkpoint
from pixtral_rt.reference.fp8_linear import Fp8Linear
from pixtral_rt.sampling import SamplingParams
from tests.helpers import small_image_messages as messages


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    args = tiny()
    write_random_checkpoint(root / "bf16", args, "mistral", seed=3)
    write_random_checkpoint(root / "fp8", args, "hf", seed=3, quantization="fp8")
    return root


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_fp8_engines_token_identical_to_fp8_reference(ckpts, n_images):
    ref, _ = load_reference_model(ckpts / "fp8", device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, Fp8Linear) for m in ref.modules()) == 7 * ref.args.n_layers
    eng = Engine.load(ckpts / "fp8", device="cpu", progress=False)                  # over the serving engine
    assert eng.info["quantization"] == "fp8" and "fp8" in eng.info["precision"]
    req = eng.encode(messages(n_images, n_images), SamplingParams(max_tokens=12))
    want = ref.generate(req.tokens, [im.float() for im in req.images], max_new_tokens=12, eos_id=None)
    got = eng.generate(messages(n_images, n_images), SamplingParams(max_tokens=12))
    assert got.token_ids == want[:len(got.token_ids)] and len(got.token_ids) >= 1
    eng.shutdown()


def test_quantized_at_load_equals_fp8_checkpoint(ckpts):
    a = Engine.load(ckpts / "fp8", device="cpu", progress=False)
    b = Engine.load(ckpts / "bf16", device="cpu", progress=False, quantization="fp8")
    c = Engine.load(ckpts / "bf16", device="cpu", progress=False)
    m = messages(1, 7)
    p = SamplingParams(max_tokens=10)
    ra, rb = (e.generate(m, p) for e in (a, b))
    assert ra.token_ids == rb.token_ids
    assert b.info["quantization"] == "fp8" and c.info["quantization"] is None
    for e in (a, b, c):
        e.shutdown()
    # the two FP8 models hold the same bytes, and FP8 really changes the logits of the bf16 model
    f8, _ = load_reference_model(ckpts / "fp8")
    q8, _ = load_reference_model(ckpts / "bf16", quantization="fp8")
    bf, _ = load_reference_model(ckpts / "bf16")
    toks = torch.tensor(a.encode(messages(0, 1), p).tokens)
    with torch.no_grad():
        lf, lq, lb = (x.forward_tokens(toks) for x in (f8, q8, bf))
    assert torch.equal(lf, lq)
    assert (lf - lb).abs().max() > 1e-3 * lb.abs().max()


def test_cli_json_says_fp8(ckpts):
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"), "--device",
                          "cpu", "--quantization", "fp8", "--prompt", "hi", "--max-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["quantization"] == "fp8" and "e4m3" in res["precision"]
    assert "fp8 e4m3 decoder linears" in out.stderr


def test_cli_refuses_unknown_quantization_and_random_with_model(ckpts):
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--quantization", "nf4", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nf4" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"),
                          "--random-weights", "tiny", "--device", "cpu", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not both" in out.stderr


def test_random_weights_preset_on_device(ckpts):
    """--random-weights draws the same model as the writer of that seed (seed 0), here on the CPU."""
    e = Engine.load(random_weights="tiny", device="cpu", progress=False, quantization="fp8")
    assert e.info["random_weights"] and e.info["quantization"] == "fp8"
    assert len(e.generate(messages(1, 2), SamplingParams(max_tokens=4)).token_ids) >= 1
    e.shutdown()
