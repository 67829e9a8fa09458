"""What a request's timings say: every stage of the time to first token measured, none invented.

TTFT = encode (host: images, tokens) + queue (submission -> admission) + vision encoder + prefill, plus the
delivery of the first token (sampling is inside prefill). On CPU the engine's step is synchronous and is
delivered at once, so the stages must add up to the measured TTFT within a small slack; a vision time of 0
for a request with images (what the engine reported before) fails here.
"""
import numpy as np
import pytest

from pixtral_rt.sampling import SamplingParams
from pixtral_rt.serving.llm_engine import LLMEngine
from tests.conftest import requires_gpu

STAGES = ("encode_ms", "queue_ms", "vision_ms", "prefill_ms")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
def eng(request):
    # cuda: the tiny config's random weights on the GPU, so the fast model (Triton, CUDA graphs) and its
    # CUDA-event timings are what is checked
    kw = dict(random_weights="tiny") if request.param == "cuda" else {}
    e = LLMEngine.load(None, device=request.param, max_batch=4, max_queue=16, kv_tokens=4096 + 1024, page_size=16,
                       chunk_tokens=48, progress=False, **kw)
    yield e
    e.shutdown()


def _msgs(seed, sizes, text="Describe the pictures in detail, please."):
    rng = np.random.default_rng(seed)
    imgs = [{"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)} for h, w in sizes]
    return [{"role": "user", "content": imgs + [{"type": "text", "text": text}]}]


def _check_sum(t: dict) -> None:
    total = sum(t[k] for k in STAGES)
    # the stages are disjoint parts of the TTFT; what is left is handing the first token over (a queue hop)
    assert total <= t["ttft_ms"] + 1.0, t
    assert t["ttft_ms"] - total <= max(15.0, 0.2 * t["ttft_ms"]), t


@pytest.mark.parametrize("sizes", [[(40, 56)], [(16, 16), (70, 20), (33, 90)]], ids=["1 image", "3 images"])
def test_image_request_stages_are_measured_and_add_up(eng, sizes):
    res = eng.generate(_msgs(len(sizes), sizes), SamplingParams(max_tokens=4))
    t = res.timings
    for k in STAGES + ("ttft_ms",):
        assert k in t and t[k] >= 0, (k, t)
    assert t["vision_ms"] > 0, t
    assert t["prefill_ms"] > 0, t
    _check_sum(t)


def test_text_request_has_no_vision_time(eng):
    res = eng.generate([{"role": "user", "content": "word " * 120}], SamplingParams(max_tokens=3))
    t = res.timings
    assert t["vision_ms"] == 0.0 and t["prefill_ms"] > 0, t
    _check_sum(t)


def test_queue_time_parts_add_up(eng):
    """queue_ms = submit()'s host work + the step thread's wake-up + the schedule call, each measured (the
    split that tells which one a slow queue_ms is)."""
    res = eng.generate([{"role": "user", "content": "word " * 200}], SamplingParams(max_tokens=2))
    t = res.timings
    parts = [t["queue_submit_ms"], t["queue_wake_ms"], t["queue_schedule_ms"]]
    assert all(p >= 0 for p in parts) and t["queue_submit_ms"] > 0 and t["queue_schedule_ms"] > 0, t
    assert abs(sum(parts) - t["queue_ms"]) < 1e-6, t


def test_long_prompt_prefill_sums_its_chunks(eng):
    """A prompt over several steps' chunks (chunk_tokens 48 while another request decodes): prefill_ms adds
    every chunk's time, so it is not just the last one. Checked against the one-chunk run of the same prompt:
    both cover the whole prompt, so the multi-chunk total must be of the same order, not a fraction."""
    m = _msgs(7, [(64, 64)], "tell me " * 60)
    alone = eng.generate(m, SamplingParams(max_tokens=2)).timings
    eng.runner.features.clear()
    eng.pool.forget_cached()
    import threading
    busy = threading.Thread(target=eng.generate, args=([{"role": "user", "content": "x"}],
                                                       SamplingParams(max_tokens=40)))
    busy.start()
    chunked = eng.generate(m, SamplingParams(max_tokens=2)).timings
    busy.join()
    assert chunked["vision_ms"] > 0 and chunked["prefill_ms"] > 0.3 * alone["prefill_ms"], (alone, chunked)


def test_cached_image_costs_no_vision_time(eng):
    """The same pixels again: features come from the cache (and the prompt pages from the prefix cache)."""
    m = _msgs(11, [(48, 48)])
    first = eng.generate(m, SamplingParams(max_tokens=2)).timings
    again = eng.generate(m, SamplingParams(max_tokens=2)).timings
    assert first["vision_ms"] > 0 and again["vision_ms"] == 0.0, (first, again)
