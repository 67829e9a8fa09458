"""Tensor parallelism on the CPU over gloo (the same code path as NCCL on GPUs): the tiny model sharded over
2 processes gives the TP=1 tokens for 0, 1 and 3 images and logits within fp32 round-off; the CLI starts
its workers itself and under torchrun; a worker failing at load or mid-request gives one clear error and
every process exits."""
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from pixtral_rt.config import tiny
from pixtral_rt.engine import Engine
from pixtral_rt.random_weights import write_random_checkpoint
from pixtral_rt.sampling import SamplingParams
from tests.helpers import ctrl_c_default
from tests.helpers import small_image_messages as messages


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    write_random_checkpoint(root / "m", tiny(), "mistral", seed=5)
    write_random_checkpoint(root / "hf", tiny(), "hf", seed=5)
    return root


@torch.inference_mode()
def prompt_logits(engine, req):
    """Last-token logits of a prompt through the engine's model (pages 1.. of an idle engine)."""
    m = engine.llm.runner.model
    P, T = m.page_size, req.prompt_tokens
    toks = torch.tensor(req.tokens)
    h = m.embed(toks)
    if req.images:
        h = h.clone()
        h[torch.tensor(req.image_token_positions)] = m.image_features(req).to(h.dtype)
    pos = torch.arange(T, dtype=torch.int32)
    table = torch.arange(1, -(-T // P) + 1, dtype=torch.int32)[None]
    return m.prefill(h, pos, pos // P + 1, pos % P, table, torch.tensor([0, T], dtype=torch.int32),
                     torch.zeros(1, dtype=torch.int32), T, torch.tensor([T - 1]))[0]


@pytest.mark.parametrize("fmt,lm_head", [("m", "replicated"), ("hf", "replicated"), ("m", "vocab")])
def test_tp2_equals_tp1(ckpt, fmt, lm_head, monkeypatch):
    """TP=2 gives TP=1's tokens and prompt logits (fp32 round-off), with the lm_head replicated or split by
    vocabulary rows (RuntimeOptions(tp_lm_head="vocab"): logit slices all-gathered), carried to the follower."""
    from pixtral_rt.options import RuntimeOptions
    one = Engine.load(ckpt / fmt, device="cpu", progress=False)
    two = Engine.load(ckpt / fmt, device="cpu", progress=False, tensor_parallel=2,
                      options=RuntimeOptions(tp_lm_head=lm_head))
    assert two.info["tensor_parallel"] == 2 and one.info["tensor_parallel"] == 1
    assert f"lm_head {lm_head}" in two.info["backend"], two.info["backend"]
    try:
        for n in (0, 1, 3):
            m = messages(n, n)
            p = SamplingParams(max_tokens=10)
            a, b = one.generate(m, p), two.generate(m, p)
            assert a.token_ids == b.token_ids and len(a.token_ids) >= 1, n
            req = one.encode(m, p)
            la, lb = prompt_logits(one, req), prompt_logits(two, req)
            err = float((la - lb).abs().max() / la.abs().max())
            assert err < 1e-5, (n, err)            # partial sums in another order: fp32 round-off only
            assert not torch.equal(la, torch.zeros_like(la))
    finally:
        two.shutdown()
        one.shutdown()


def test_one_rank_forced_takes_the_tp_path(ckpt, monkeypatch):
    """PIXTRAL_RT_TP_ONE_RANK=1 runs --tensor-parallel 1 through the leader / process-group path (how a one-GPU
    machine checks the NCCL path, tests/test_tp_gpu.py): same tokens and logits as the plain engine."""
    one = Engine.load(ckpt / "m", device="cpu", progress=False)
    monkeypatch.setenv("PIXTRAL_RT_TP_ONE_RANK", "1")
    forced = Engine.load(ckpt / "m", device="cpu", progress=False)
    try:
        assert "tensor parallel 1" in forced.info["backend"] and "tensor parallel" not in one.info["backend"]
        for n in (0, 2):
            m = messages(n, n)
            p = SamplingParams(max_tokens=8)
            assert one.generate(m, p).token_ids == forced.generate(m, p).token_ids, n
            req = one.encode(m, p)
            assert torch.equal(prompt_logits(one, req), prompt_logits(forced, req))
    finally:
        forced.shutdown()
        one.shutdown()


def test_same_gpu_mode_devices_and_backend(monkeypatch):
    """PIXTRAL_RT_TP_SAME_GPU=1 (the one-GPU test mode of tests/test_tp_gpu.py): followers on the leader's
    GPU and gloo for the data group; without it one GPU per rank and NCCL; the CPU is gloo either way."""
    from pixtral_rt import tensor_parallel as tpm
    cuda0, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("PIXTRAL_RT_TP_SAME_GPU", raising=False)
    assert tpm.backend_for(cuda0) == "nccl" and tpm.backend_for(cpu) == "gloo"
    assert [tpm.follower_device(r, torch.device("cuda")) for r in (1, 2, 3)] == [torch.device("cuda", r)
                                                                                for r in (1, 2, 3)]
    monkeypatch.setenv("PIXTRAL_RT_TP_SAME_GPU", "1")
    assert tpm.backend_for(cuda0) == "gloo" and tpm.backend_for(cpu) == "gloo"
    assert {tpm.follower_device(r, torch.device("cuda")) for r in (1, 2, 3)} == {cuda0}
    assert tpm.follower_device(1, cpu) == cpu


def _cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pixtral_rt.generate", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _alive_with_mark(mark):
    """pids of live processes whose environment carries PIXTRAL_RT_TEST_MARK=mark."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if f"PIXTRAL_RT_TEST_MARK={mark}".encode() in f.read():
                    pids.append(int(d))
        except OSError:
            continue
    return pids


def test_cli_tp2_same_tokens_as_tp1(ckpt):
    base = ["--model", str(ckpt / "m"), "--device", "cpu", "--prompt", "Hello there", "--max-tokens", "6", "--json"]
    a = _cli(base)
    mark = uuid.uuid4().hex
    b = _cli(base + ["--tensor-parallel", "2"], {"PIXTRAL_RT_TEST_MARK": mark})
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-1500:], b.stderr[-1500:])
    assert json.loads(a.stdout)["generated_token_ids"] == json.loads(b.stdout)["generated_token_ids"]
    time.sleep(1.0)
    assert _alive_with_mark(mark) == []               # no worker outlives the command


@pytest.mark.parametrize("fault,where", [("1:load", "load"), ("1:decode:2", "decode")])
def test_worker_failure_gives_one_error_and_every_process_exits(ckpt, fault, where):
    mark = uuid.uuid4().hex
    r = _cli(["--model", str(ckpt / "m"), "--device", "cpu", "--prompt", "Hello", "--max-tokens", "6",
              "--tensor-parallel", "2"], {"PIXTRAL_RT_TP_FAULT": fault, "PIXTRAL_RT_TEST_MARK": mark}, timeout=180)
    assert r.returncode != 0
    errs = [l for l in r.stderr.splitlines() if "error" in l.lower()]
    assert any("tensor-parallel worker rank 1" in l and f"injected fault on rank 1 at {where}" in l for l in errs), \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    time.sleep(1.5)
    assert _alive_with_mark(mark) == []


def test_tp_refuses_bad_sizes(ckpt):
    r = _cli(["--model", str(ckpt / "m"), "--device", "cpu", "--prompt", "x", "--tensor-parallel", "3"])
    assert r.returncode != 0 and "--tensor-parallel 3" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["--model", str(ckpt / "m"), "--device", "cpu", "--prompt", "x", "--tensor-parallel", "0"])
    assert r.returncode == 2 and "--tensor-parallel must be >= 1" in r.stderr


def test_torchrun_launch(ckpt):
    """torchrun starts both ranks; rank 0 answers, rank 1 follows and exits with it."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, PIXTRAL_RT_TEST_MARK=mark, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "pixtral_rt.generate", "--model", str(ckpt / "m"),
                        "--device", "cpu", "--prompt", "Hello there", "--max-tokens", "6", "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    one = _cli(["--model", str(ckpt / "m"), "--device", "cpu", "--prompt", "Hello there", "--max-tokens", "6",
                "--json"])
    outs = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(outs) == 1                                # only rank 0 prints
    assert json.loads(outs[0])["generated_token_ids"] == json.loads(one.stdout)["generated_token_ids"]
    time.sleep(1.0)
    assert _alive_with_mark(mark) == []


# ----------------------------------------------------------------------------- FastDecoder over 2 ranks
def _fast_rank(rank, world, port, sd, seqs, q, lm_head):
    import torch.distributed as dist

    from pixtral_rt.decoder import FastDecoder
    from pixtral_rt.sharding import shard_tensor, sharded_args
    from tests.test_decoder_fast import run_fast
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    args = tiny(vocab_size=1000).text
    shard = {k: shard_tensor(v, k, rank, world, lm_head) for k, v in sd.items()}   # "vocab": output.weight split
    dec = FastDecoder(sharded_args(args, world), shard, max_batch=2, max_seq=40,
                      gemv_backend="triton", decode_fusion="none+pdl", tp_group="world",
                      vocab_parallel=lm_head == "vocab")
    out = run_fast(dec, seqs, splits=[[5]], n_decode=3)
    if rank == 0:
        # by value (numpy): a torch tensor goes through a shared-memory fd that the receiver fetches from this
        # process, which may have exited by then (EOFError seen in a CI run)
        q.put(out[0].detach().cpu().numpy())
    dist.destroy_process_group()


def test_one_gpu_per_rank_is_checked_first(monkeypatch):
    """--tensor-parallel N on a machine with fewer GPUs: one clear error before any process starts (the
    same-GPU test mode and the CPU are exempt)."""
    from pixtral_rt import tensor_parallel as tpm
    monkeypatch.delenv("PIXTRAL_RT_TP_SAME_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match=r"--tensor-parallel 2 needs 2 GPUs \(one per rank\) but 1 is visible "
                                         r"\(CUDA_VISIBLE_DEVICES=3\)"):
        tpm.check_gpus(2, torch.device("cuda"))
    tpm.check_gpus(1, torch.device("cuda"))
    tpm.check_gpus(4, torch.device("cpu"))
    monkeypatch.setenv("PIXTRAL_RT_TP_SAME_GPU", "1")
    tpm.check_gpus(2, torch.device("cuda"))


def test_tp_knobs_are_checked(monkeypatch):
    """The lm_head / all-reduce choices (RuntimeOptions, the --tp-lm-head / --tp-allreduce flags, FastDecoder's
    arguments): defaults, and an unknown or impossible choice is an error that names it."""
    from pixtral_rt.cli_flags import add_runtime_flags, runtime_options
    from pixtral_rt.decoder import FastDecoder
    from pixtral_rt.options import RuntimeOptions
    from pixtral_rt.reference.transformer import Transformer
    assert RuntimeOptions() == RuntimeOptions(tp_lm_head="vocab", tp_allreduce="nccl", preprocess="auto")
    with pytest.raises(ValueError, match="tp_allreduce 'ring': choose one of nccl, symm"):
        RuntimeOptions(tp_allreduce="ring")
    import argparse
    p = argparse.ArgumentParser()
    add_runtime_flags(p)
    assert runtime_options(p.parse_args(["--tp-lm-head", "replicated", "--tp-allreduce", "symm"])) == \
        RuntimeOptions(tp_lm_head="replicated", tp_allreduce="symm")
    assert RuntimeOptions(**RuntimeOptions(tp_allreduce="symm").to_dict()) == RuntimeOptions(tp_allreduce="symm")
    args = tiny(vocab_size=1000).text
    sd = dict(Transformer(args).state_dict())
    with pytest.raises(ValueError, match="vocab_parallel needs a tp_group"):
        FastDecoder(args, dict(sd), vocab_parallel=True)
    with pytest.raises(ValueError, match="tp_allreduce must be 'nccl' or 'symm', got 'ring'"):
        FastDecoder(args, dict(sd), tp_allreduce="ring")


@pytest.mark.parametrize("lm_head", ["replicated", "vocab"])
def test_fast_decoder_tp2_equals_tp1_interpreter(lm_head):
    """The GPU decoder's tensor-parallel math (all-reduce after wo and w2, sharded heads / FFN; the lm_head
    whole, or split by vocabulary rows with the logits all-gathered), run in the Triton interpreter over
    gloo: TP=2 logits equal TP=1's to fp32 round-off, prefill and batch-1 decode."""
    import multiprocessing as mp

    from pixtral_rt.decoder import FastDecoder
    from pixtral_rt.reference.transformer import Transformer
    from pixtral_rt.tensor_parallel import _free_port
    from tests.test_decoder_fast import randomize, run_fast
    args = tiny(vocab_size=1000).text
    model = Transformer(args)
    randomize(model, 3)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 1000, (14,), generator=g).tolist()]
    ref = run_fast(FastDecoder(args, dict(sd), max_batch=2, max_seq=40, gemv_backend="triton",
                               decode_fusion="none+pdl"), seqs, splits=[[5]], n_decode=3)[0]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_fast_rank, args=(r, 2, port, sd, seqs, q, lm_head)) for r in range(2)]
    for p in procs:
        p.start()
    got = torch.from_numpy(q.get(timeout=600))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_stops_every_rank(ckpt, sig):
    """SIGTERM (kill) or SIGINT (Ctrl-C) to the CLI while it generates: it exits and no worker outlives it."""
    import signal
    mark = uuid.uuid4().hex
    env = dict(os.environ, PIXTRAL_RT_TEST_MARK=mark)
    p = subprocess.Popen([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpt / "m"), "--device", "cpu",
                          "--prompt", "Tell a very long story.", "--max-tokens", "3000", "--tensor-parallel", "2",
                          "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=ctrl_c_default)
    p.stdout.read(1)                                   # generation has started
    assert len(_alive_with_mark(mark)) >= 2            # rank 0 and its worker
    p.send_signal(getattr(signal, sig))
    rc = p.wait(60)
    assert rc != 0
    time.sleep(2.0)
    assert _alive_with_mark(mark) == []


def test_server_with_tp2_answers_and_stops_every_rank(ckpt, tmp_path):
    """python -m pixtral_rt.serve --tensor-parallel 2: answers like the CLI at TP=1; SIGTERM drains, exits 0,
    and takes its worker with it."""
    httpx = pytest.importorskip("httpx", reason="httpx is a test dependency of the server tests ('.[test]')")
    pytest.importorskip("fastapi", reason="the server needs fastapi / uvicorn ('.[serve]')")
    from tests.test_serve import Server
    mark = uuid.uuid4().hex
    env = dict(os.environ, PIXTRAL_RT_TEST_MARK=mark)
    srv = Server(env, tmp_path / "serve.log", "--model", str(ckpt / "m"), "--tensor-parallel", "2")
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert len(_alive_with_mark(mark)) >= 2
    finally:
        rc = srv.stop()
    one = _cli(["--model", str(ckpt / "m"), "--device", "cpu", "--prompt", "Hello there", "--max-tokens", "6",
                "--json"])
    assert text == json.loads(one.stdout)["text"]
    assert rc == 0, srv.log()
    time.sleep(1.5)
    assert _alive_with_mark(mark) == []
