"""GPU: the engine that runs (Engine over LLMEngine: FastDecoder's paged kernels, CUDA graphs, the fast
vision encoder) on full-size random Pixtral-12B weights, bf16, against the PyTorch reference model.
The greedy-tokens-vs-fp32 test is in tests/test_engine_gpu_accuracy.py (a process of its own).

Graph replay must equal eager decoding; the vision graphs and GPU preprocessing must match eager / host."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from tests.conftest import requires_gpu

pytestmark = [requires_gpu, pytest.mark.gpu]
PRESET = "Pixtral-12B-2409"


@pytest.fixture(scope="module")
def held():
    """{"engine": Engine}; a test may pop it and shut it down (tests/test_engine_gpu_accuracy.py, which
    imports this fixture, does, to make room for the reference model)."""
    from pixtral_rt.engine import Engine
    # no local name for the engine: this generator's frame lives until the module ends, and a local would keep
    # the engine's 27 GiB alive after a test shuts it down (measured: 27.2 GiB still allocated)
    h = {"engine": Engine.load(random_weights=PRESET, max_context=8192, kv_tokens=16384, max_images=4,
                               progress=False)}
    yield h
    if "engine" in h:
        h.pop("engine").shutdown()


def _reference(dtype=torch.bfloat16):
    """The reference model with the engine's weights (the same seeded draw on the GPU)."""
    from pixtral_rt.loading import load_reference_model, resolve_model
    src = resolve_model(None, "cuda", "bfloat16", None, random_weights=PRESET, quiet=True, with_tokenizer=False)
    return load_reference_model(src, progress=False)


def _messages(n_images: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (17, 200), (300, 301)][:n_images]
    content = [{"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)} for h, w in sizes]
    return [{"role": "user", "content": content + [{"type": "text", "text": "Describe what you see."}]}]


def _host_request(eng, msgs, max_tokens):
    from pixtral_rt.chat import encode_request
    return encode_request(msgs, eng.tokenizer, eng.args, max_images=eng.max_images, max_context=eng.max_context,
                          max_tokens=max_tokens, raw_pixels=False)      # normalised on the host, for the reference


def test_graph_replay_equals_eager(held):
    from pixtral_rt.sampling import SamplingParams
    eng = held["engine"]
    p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=5)
    msgs = _messages(0, seed=9)
    a = eng.generate(msgs, p).token_ids
    runner = eng.llm.runner
    runner.use_graphs = False
    try:
        b = eng.generate(msgs, p).token_ids
    finally:
        runner.use_graphs = True
    assert len(a) >= 1 and a == b


def test_vision_graph_bucket_padding_matches_eager(held):
    from pixtral_rt.sampling import SamplingParams
    from pixtral_rt.vision import request_patches
    eng = held["engine"]
    model = eng.llm.runner.model                     # FastPagedModel
    msgs = _messages(3, seed=4)
    host = _host_request(eng, msgs, 1)
    raw = eng.encode(msgs, SamplingParams(max_tokens=1))
    assert raw.images_are_raw and not host.images_are_raw
    p = eng.args.vision.patch_size
    ref = _reference()
    try:
        with torch.inference_mode():
            # GPU preprocessing into the packed buffer == host preprocessing (mistral_common-exact, 1e-4)
            assert (request_patches(raw, p, "cuda") - request_patches(host, p, "cuda")).abs().max().item() <= 1e-4
            graphed = model.image_features(raw).float().clone()
            model.use_graphs = False
            try:
                eager = model.image_features(host).float()
            finally:
                model.use_graphs = True
            refd = ref.image_features([im.to("cuda", torch.bfloat16) for im in host.images]).float()
    finally:
        del ref
        gc.collect()
        torch.cuda.empty_cache()
    assert graphed.shape == eager.shape == refd.shape
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(graphed, eager) < 1e-2
    assert rel(graphed, refd) < 2e-2
