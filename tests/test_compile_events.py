"""Nothing compiles, tunes or captures on the request path (issue 12): the engine's counters
(LLMEngine.compile_events) do not move across the first request of a new image mix in a fresh engine.
CPU: the counters exist, stay put across a request of the reference engine, and do move when a request
path captures or tunes (negative control). GPU: the fast engine,
random Pixtral-12B, after load: a 2-image odd-size request and the 4-image set, each the first of its kind."""
import numpy as np
import pytest
import torch

from pixtral_rt import compile_events
from pixtral_rt.sampling import SamplingParams
from tests.conftest import requires_gpu


def _req(sizes, seed):
    rng = np.random.default_rng(seed)
    return [{"role": "user", "content": [{"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
                                         for h, w in sizes] + [{"type": "text", "text": "Describe them."}]}]


def test_counters_see_request_path_work_cpu(tmp_path, monkeypatch):
    """On CPU the reference engine compiles and captures nothing, so "the counters did not move" would hold
    for counters that never count: a negative control makes the comparison able to fail. A request path that
    captures a graph and tunes a kernel (simulated by wrapping the model runner's step) must show in them."""
    from pixtral_rt.config import tiny
    from pixtral_rt.random_weights import write_random_checkpoint
    from pixtral_rt.serving.llm_engine import LLMEngine
    write_random_checkpoint(tmp_path / "m", tiny(), "mistral", seed=2)
    eng = LLMEngine.load(tmp_path / "m", device="cpu", progress=False)

    class Tuner:                                         # an autotuner whose cache a request fills
        cache: dict = {}
    try:
        before = eng.compile_events()
        assert set(before) == {"triton_compile", "autotune", "graph_capture"}
        eng.generate(_req([(40, 56), (17, 90)], 1), SamplingParams(max_tokens=3))
        assert eng.compile_events() == before

        compile_events.register_autotuner(Tuner)
        run = eng.runner.run

        def run_that_captures_and_tunes(plan, before_sample=None):
            compile_events.captured()
            Tuner.cache[len(Tuner.cache)] = "config"
            return run(plan, before_sample)

        monkeypatch.setattr(eng.runner, "run", run_that_captures_and_tunes)
        eng.generate(_req([(40, 56)], 2), SamplingParams(max_tokens=2))
        got = eng.compile_events()
        assert got["graph_capture"] > before["graph_capture"] and got["autotune"] > before["autotune"], (before, got)
    finally:
        if Tuner in compile_events._autotuners:
            compile_events._autotuners.remove(Tuner)
        eng.shutdown()


def test_warm_request_leaves_no_trace(tmp_path):
    """The load's warm-up request (run on the GPU engine) leaves the caches and counters as a fresh engine's."""
    from pixtral_rt.config import tiny
    from pixtral_rt.random_weights import write_random_checkpoint
    from pixtral_rt.serving.llm_engine import LLMEngine
    write_random_checkpoint(tmp_path / "m", tiny(), "mistral", seed=2)
    eng = LLMEngine.load(tmp_path / "m", device="cpu", progress=False)
    try:
        fresh = eng.metrics()
        secs = eng.warm_request()
        assert secs > 0
        assert eng.metrics() == fresh
        assert eng.pool.used == 0 and not eng.pool.page_of and not eng.pool.lru
        assert not eng.runner.features.items
        eng.pool.check()
        out = eng.generate(_req([(40, 56)], 3), SamplingParams(max_tokens=3))
        assert out.prompt_tokens > 0 and eng.metrics()["requests_finished_total"] == 1
    finally:
        eng.shutdown()


@requires_gpu
@pytest.mark.gpu
def test_first_request_of_a_new_image_mix_compiles_nothing():
    from pixtral_rt.serving.llm_engine import LLMEngine
    eng = LLMEngine.load(None, max_batch=8, max_context=16384, kv_tokens=65536, progress=False)
    try:
        after_load = eng.compile_events()
        print(f"\nafter load: {after_load}; warm-up: {eng.info['warmup']}")
        assert after_load["graph_capture"] > 0         # the hook sees the load's captures
        # graph buckets of several sizes, the eager path (4 images: 7424 patches; 3 full + 1: 12544 rows, the
        # largest attention key), a 1-patch image, many small images
        for sizes in ([(37, 1500), (640, 480)], [(1024, 1024), (512, 768), (768, 512), (256, 256)],
                      [(1000, 600)], [(333, 777), (20, 1024), (1024, 40)], [(1024, 1024)] * 3 + [(256, 256)],
                      [(16, 16)], [(48, 80)] * 10):
            before = eng.compile_events()
            eng.generate(_req(sizes, len(sizes)), SamplingParams(max_tokens=4))
            torch.cuda.synchronize()
            got = eng.compile_events()
            print(f"{sizes}: {before} -> {got}")
            assert got == before, (f"request {sizes} compiled / tuned / captured: {before} -> {got}; "
                                   f"compiled: {compile_events.recent(got['triton_compile'] - before['triton_compile'])}")
    finally:
        eng.shutdown()
