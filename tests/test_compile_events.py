"""Nothing compiles, tunes or captures on the request path (issue 12): the engine's counters
(LLMEngine.compile_events) do not move across the first request of a new image mix in a fresh engine.
CPU: the counters exist and stay 0 (the reference engine neither compiles nor captures). GPU: the fast engine,
random Pixtral-12B, after load: a 2-image odd-size request and the 4-image set, each the first of its kind."""
import numpy as np
import pytest
import torch

from pixtral_rt.sampling import SamplingParams
from tests.conftest import requires_gpu


def _req(sizes, seed):
    rng = np.random.default_rng(seed)
    return [{"role": "user", "content": [{"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
                                         for h, w in sizes] + [{"type": "text", "text": "Describe them."}]}]


def test_counters_exist_and_cpu_engine_does_not_compile(tmp_path):
    from pixtral_rt.config import tiny
    from pixtral_rt.random_weights import write_random_checkpoint
    from pixtral_rt.serving.llm_engine import LLMEngine
    write_random_checkpoint(tmp_path / "m", tiny(), "mistral", seed=2)
    eng = LLMEngine.load(tmp_path / "m", device="cpu", progress=False)
    try:
        before = eng.compile_events()
        assert set(before) == {"triton_compile", "autotune", "graph_capture"}
        eng.generate(_req([(40, 56), (17, 90)], 1), SamplingParams(max_tokens=3))
        assert eng.compile_events() == before
    finally:
        eng.shutdown()


@requires_gpu
@pytest.mark.gpu
def test_first_request_of_a_new_image_mix_compiles_nothing():
    from pixtral_rt.serving.llm_engine import LLMEngine
    eng = LLMEngine.load(None, max_batch=8, max_context=16384, kv_tokens=65536, progress=False)
    try:
        after_load = eng.compile_events()
        print(f"\nafter load: {after_load}")
        assert after_load["graph_capture"] > 0         # the hook sees the load's captures
        for sizes in ([(37, 1500), (640, 480)], [(1024, 1024), (512, 768), (768, 512), (256, 256)],
                      [(1000, 600)], [(333, 777), (20, 1024), (1024, 40)]):
            before = eng.compile_events()
            eng.generate(_req(sizes, len(sizes)), SamplingParams(max_tokens=4))
            torch.cuda.synchronize()
            got = eng.compile_events()
            print(f"{sizes}: {before} -> {got}")
            assert got == before, f"request {sizes} compiled / tuned / captured: {before} -> {got}"
    finally:
        eng.shutdown()
