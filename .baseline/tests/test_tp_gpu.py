"""Tensor parallelism on GPUs (NCCL, decode graphs on every rank): full-size random Pixtral-12B, bf16, TP=2
against TP=1 on the same machine. Needs 2 GPUs (the nvidia-h200-x2 machine); skipped elsewhere with the
reason. On one GPU: the TP code path with a process group of one against the plain engine, and TP=2 with both
ranks on the one GPU over gloo (PIXTRAL_RT_TP_SAME_GPU: real traffic between ranks, no graphs) against TP=1,
for Pixtral-12B and Pixtral-Large's real shapes (its first 4 decoder layers). Criterion:
tests/agreement.py (every position on the shared prefix, and the first divergence), with a negative control."""
import numpy as np
import pytest
import torch

from pixtral_rt.sampling import SamplingParams
from tests.agreement import check_agreement

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")]
needs_two = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs (tensor parallel over NCCL); run on the nvidia-h200-x2 machine (benchmarks/gpu_tp.sh)")


def _msgs(i):
    rng = np.random.default_rng(i)
    imgs = [{"type": "image", "image": rng.integers(0, 256, (512 + 256 * j, 768, 3), dtype=np.uint8)}
            for j in range(i % 3)]
    return [{"role": "user", "content": imgs + [{"type": "text", "text": "Describe what you see, in detail."}]}]


COMBOS = [("replicated", "nccl"), ("vocab", "nccl"), ("replicated", "symm")]     # (lm_head, all-reduce)


@pytest.mark.parametrize("lm_head,allreduce", COMBOS)
def test_one_rank_nccl_path_matches_plain_engine(monkeypatch, lm_head, allreduce):
    """The tensor-parallel GPU path on ONE GPU (PIXTRAL_RT_TP_ONE_RANK=1): an NCCL process group of one, the
    leader's headers and broadcasts, FastDecoder's all-reduces inside the decode graphs, full-size random
    Pixtral-12B. An all-reduce over one rank is the identity, so the greedy tokens must be the plain
    engine's, token for token. (What it cannot check: traffic between ranks; that is test_tp2_agrees_with_tp1.)"""
    from pixtral_rt.serving.llm_engine import LLMEngine
    p = SamplingParams(max_tokens=24)
    kw = dict(max_batch=8, max_context=8192, kv_tokens=65536, progress=False)
    one = LLMEngine.load(None, **kw)
    alone = [one.generate(_msgs(i), p) for i in range(3)]
    one.shutdown()
    del one
    torch.cuda.empty_cache()
    monkeypatch.setenv("PIXTRAL_RT_TP_ONE_RANK", "1")
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", lm_head)     # vocab: the logits all-gather inside the graphs
    monkeypatch.setenv("PIXTRAL_RT_TP_ALLREDUCE", allreduce)  # symm: one-shot symmetric-memory sums in graphs
    forced = LLMEngine.load(None, **kw)
    try:
        want = f"tensor parallel 1 over NCCL, lm_head {lm_head}, all-reduce {allreduce}"
        assert want in forced.info["backend"], forced.info["backend"]
        got = [forced.generate(_msgs(i), p) for i in range(3)]
    finally:
        forced.shutdown()
    for i, (a, b) in enumerate(zip(alone, got)):
        assert len(a.token_ids) >= 1
        assert a.token_ids == b.token_ids, f"request {i}: one-rank TP path {b.token_ids} vs plain {a.token_ids}"


def _check_agreement(alone, got, what: str) -> None:
    check_agreement(alone, got, what + ", TP=2 vs TP=1")


@pytest.mark.parametrize("lm_head", ["replicated", "vocab"])
@pytest.mark.parametrize("preset", [None, "Pixtral-Large-Instruct-2411:layers=4"],
                         ids=["pixtral-12b", "pixtral-large-4-layers"])
def test_tp2_on_one_gpu_agrees_with_tp1(monkeypatch, preset, lm_head):
    """TP=2 with both ranks on ONE GPU (PIXTRAL_RT_TP_SAME_GPU=1: gloo between the processes, eager decode):
    each rank holds half the heads, half the KV heads and half the MLP of every layer at the real sizes, and
    the row-parallel partial sums cross between processes, as on two GPUs. Pixtral-Large's shapes (96 heads,
    8 KV heads, dim 12288) with its first 4 decoder layers: the whole model does not fit one GPU. What it
    cannot check: NCCL between GPUs and the collectives inside the decode graphs (test_tp2_agrees_with_tp1)."""
    from pixtral_rt.serving.llm_engine import LLMEngine
    p = SamplingParams(max_tokens=24)
    kw = dict(max_batch=8, max_context=4096, kv_tokens=16384, progress=False, random_weights=preset)
    one = LLMEngine.load(None, **kw)
    alone = [one.generate(_msgs(i), p, logprobs=20) for i in range(3)]
    one.shutdown()
    del one
    torch.cuda.empty_cache()
    monkeypatch.setenv("PIXTRAL_RT_TP_SAME_GPU", "1")
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", lm_head)
    two = LLMEngine.load(None, tensor_parallel=2, **kw)
    try:
        assert "tensor parallel 2 over gloo" in two.info["backend"], two.info["backend"]
        assert f"lm_head {lm_head}" in two.info["backend"], two.info["backend"]
        got = [two.generate(_msgs(i), p, logprobs=20) for i in range(3)]
    finally:
        two.shutdown()
    _check_agreement(alone, got, f"{preset or 'Pixtral-12B'}, lm_head {lm_head}, on one GPU")


@needs_two
@pytest.mark.parametrize("lm_head,allreduce", COMBOS)
def test_tp2_agrees_with_tp1(monkeypatch, lm_head, allreduce):
    from pixtral_rt.serving.llm_engine import LLMEngine
    monkeypatch.setenv("PIXTRAL_RT_TP_LM_HEAD", lm_head)
    monkeypatch.setenv("PIXTRAL_RT_TP_ALLREDUCE", allreduce)
    p = SamplingParams(max_tokens=24)
    one = LLMEngine.load(None, max_batch=8, max_context=8192, kv_tokens=65536, progress=False)
    alone = [one.generate(_msgs(i), p, logprobs=20) for i in range(3)]
    one.shutdown()
    del one
    torch.cuda.empty_cache()
    two = LLMEngine.load(None, max_batch=8, max_context=8192, kv_tokens=65536, progress=False, tensor_parallel=2)
    try:
        got = [two.generate(_msgs(i), p, logprobs=20) for i in range(3)]
    finally:
        two.shutdown()
    _check_agreement(alone, got, f"Pixtral-12B, lm_head {lm_head}, all-reduce {allreduce}, on 2 GPUs")


def test_agreement_check_catches_a_lost_partial_sum(monkeypatch):
    """The negative control of the one-GPU TP=2 test: rank 0 takes part in every all-reduce but keeps its own
    partial sums (it loses rank 1's half of every wo / w2 output). _check_agreement must reject that, or it
    could not catch a sharding bug. Pixtral-Large's first 4 layers (the quickest full-width model to load)."""
    from pixtral_rt.decoder import FastDecoder
    from pixtral_rt.serving.llm_engine import LLMEngine
    p = SamplingParams(max_tokens=8)
    kw = dict(max_batch=8, max_context=4096, kv_tokens=16384, progress=False,
              random_weights="Pixtral-Large-Instruct-2411:layers=4")
    one = LLMEngine.load(None, **kw)
    alone = [one.generate(_msgs(i), p, logprobs=20) for i in range(2)]
    one.shutdown()
    del one
    torch.cuda.empty_cache()

    def lossy_reduce(self, y):
        if self.tp_group is not None:
            torch.distributed.all_reduce(y.clone(), group=self.tp_group)      # the followers stay in step
        return y
    monkeypatch.setattr(FastDecoder, "_reduce", lossy_reduce)             # rank 0 (this process) only
    monkeypatch.setenv("PIXTRAL_RT_TP_SAME_GPU", "1")
    two = LLMEngine.load(None, tensor_parallel=2, **kw)
    try:
        got = [two.generate(_msgs(i), p, logprobs=20) for i in range(2)]
    finally:
        two.shutdown()
    with pytest.raises(AssertionError, match="share|differ|left"):
        _check_agreement(alone, got, "lossy all-reduce (must fail)")
