"""Serving benchmark: a seeded mixed workload through the HTTP server (`python -m pixtral_rt.serve`) with the
official `openai` async client at several concurrency levels, against the same requests sent one at a time
to the batch-1 engine (pixtral_rt.engine.Engine, the pre-serving runtime) in the same run.

Workload (fixed seed): 2/3 text-only prompts of 100-1000 words, 1/3 with one image (512x512 or 1024x1024
random pixels, data: URL); output lengths 32-256 tokens; greedy; ignore EOS is not available over the API,
random weights rarely emit it (the token counts used are the ones reported in `usage`).
Per level: output tok/s, requests/s, TTFT and inter-token latency p50 / p99 (client side, per streamed
chunk), GPU memory used. Pure decode at the top level: the aggregate rate while every stream decodes (the
window from the last stream's first chunk to the first stream's end: no prompt ramp, no tail). Floors: the decode-step HBM roofline at the level's concurrency (weights once per
step + every sequence's KV) -> tok/s; the batch-1 engine's own rate as the baseline. Steady state too: the
same figures without each user's first request (all users' first prompts arrive at once: a burst of 64 prompts
is ~75k prefill tokens, seconds of compute that no schedule hides). `--chunk-tokens N`: the server's prefill
budget per step while others decode; `--prefill-schedule fifo|fair`: how it is shared among prompts.
Also: batch-1 decode through the server vs the batch-1 engine (1k-token text prompt, 256 tokens), and
turn-2 TTFT of a chat with one 1024x1024 image with the prefix cache (turn 1 first) vs without (same
conversation with a fresh image: nothing cached).

    python benchmarks/bench_serve.py --model /tmp/p12b [--levels 1,4,16,64] [--port 8011]

KV pages on demand (issue 20): `--no-max-tokens` sends every request without max_tokens (the server then
reserves nothing for the answer) and the client disconnects after the workload's output length, counted in
streamed content chunks (a chunk holds at least one token); output tok/s then comes from the server's own
`pixtral_rt_generation_tokens_total` (what it generated before the disconnect reached it). `--kv-tokens N`
gives the server a pool of N tokens, so preemption happens; every level records the preemptions it caused
(`pixtral_rt_preemptions_total`). Throughput with and without preemption, same machine, same run:

    python benchmarks/bench_serve.py --no-baseline --engine process --levels 64 --no-max-tokens
    python benchmarks/bench_serve.py --no-baseline --engine process --levels 64 --no-max-tokens --kv-tokens 40000
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_TBps, record as _record  # noqa: E402

BENCH = "serve"
WORDS = "the a of river image light stone window garden city music table paper cloud green small old".split()


def png_data_url(rng, h, w) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(n: int, seed: int = 0) -> list[tuple[list, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, int(rng.integers(100, 1000))))
        content = [{"type": "text", "text": text}]
        if i % 3 == 2:
            side = int(rng.choice([512, 1024]))
            content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(rng, side, side)}})
        out.append(([{"role": "user", "content": content}], int(rng.integers(32, 257))))
    return out


async def one(client, model, messages, max_tokens, stats, no_max_tokens=False):
    """One streamed request. no_max_tokens: sent without max_tokens; the client leaves after max_tokens
    content chunks (>= that many tokens), so n_out counts chunks (the level's tok/s uses the server's count)."""
    t0 = time.perf_counter()
    times, n_out = [], 0
    limit = {} if no_max_tokens else {"max_tokens": max_tokens}
    stream = await client.chat.completions.create(model=model, messages=messages, temperature=0.0, stream=True,
                                                  stream_options={"include_usage": True}, **limit)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            if no_max_tokens and len(times) >= max_tokens:
                n_out = len(times)
                await stream.close()          # the disconnect cancels the request on the server
                break
        if chunk.usage is not None:
            n_out = chunk.usage.completion_tokens
    if times:
        stats["ttft"].append(times[0] - t0)
        stats["itl"] += list(np.diff(times))
        stats.setdefault("streams", []).append((np.asarray(times), n_out / len(times)))   # chunk times, tokens/chunk
    stats["tokens"] += n_out
    stats["requests"] += 1


def decode_window(streams) -> dict:
    """Pure decode of concurrent streams: from the moment the last stream got its first chunk (every stream
    decoding, no prompt left to prefill) to the moment the first stream ended. Tokens in that window (chunks
    x each stream's tokens per chunk) / its length, and the inter-chunk gaps inside it."""
    if len(streams) < 2:
        return {}
    t_a = max(t[0] for t, _ in streams)
    t_b = min(t[-1] for t, _ in streams)
    if t_b - t_a < 0.05:
        return {}
    toks, gaps = 0.0, []
    for t, per in streams:
        w = t[(t > t_a) & (t <= t_b)]
        toks += len(w) * per       # chunks after t_a (the one at t_a opens the gap)
        gaps += list(np.diff(t[(t >= t_a) & (t <= t_b)]))
    return {"tok_s": toks / (t_b - t_a), "window_s": t_b - t_a,
            "itl_p50_ms": float(np.percentile(gaps, 50)) * 1e3, "itl_p99_ms": float(np.percentile(gaps, 99)) * 1e3}


def server_metrics(port) -> dict[str, float]:
    """The server's Prometheus counters and gauges (unlabelled samples only)."""
    out = {}
    for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def prepare_ms(port) -> dict[str, float]:
    """The server's summed host time per stage before its engine (pixtral_rt_request_prepare_seconds), in ms."""
    out = {}
    for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode().splitlines():
        if line.startswith("pixtral_rt_request_prepare_seconds_sum{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('stage="', 1)[1].split('"', 1)[0]] = float(value) * 1e3
    return out


def _prepare_delta(p0: dict, p1: dict) -> dict[str, float]:
    """prepare_ms after a request minus before it: that request's stages."""
    return {k: round(v - p0.get(k, 0.0), 3) for k, v in p1.items()}


async def run_level(port, model, reqs, users, no_max_tokens=False):
    """Stats of the level; with the server's generated tokens and preemptions over it (deltas of /metrics),
    and the peak of running requests seen by a 10 Hz poll."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)
    stats = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "streams": []}
    steady = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "streams": []}   # each user's 2nd request on
    it = iter(reqs)

    async def user():
        for i, (m, k) in enumerate(it):
            part = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "streams": []}
            await one(client, model, m, k, part, no_max_tokens)
            for d in (stats, steady) if i else (stats,):
                for key in part:
                    d[key] += part[key]

    loop = asyncio.get_running_loop()
    m0 = await loop.run_in_executor(None, server_metrics, port)
    peak, done = 0, False

    async def poll():
        nonlocal peak
        while not done:
            m = await loop.run_in_executor(None, server_metrics, port)
            peak = max(peak, m.get("pixtral_rt_requests_running", 0))
            await asyncio.sleep(0.1)
    poller = asyncio.ensure_future(poll())
    t0 = time.perf_counter()
    await asyncio.gather(*[user() for _ in range(users)])
    stats["wall"] = time.perf_counter() - t0
    stats["steady"] = steady
    done = True
    await poller
    await client.close()
    await asyncio.sleep(0.5)                  # the last disconnects reach the engine
    m1 = await loop.run_in_executor(None, server_metrics, port)
    stats["server_tokens"] = m1["pixtral_rt_generation_tokens_total"] - m0["pixtral_rt_generation_tokens_total"]
    stats["preemptions"] = m1.get("pixtral_rt_preemptions_total", 0) - m0.get("pixtral_rt_preemptions_total", 0)
    stats["peak_running"] = peak
    if no_max_tokens:
        stats["tokens"] = stats["server_tokens"]
    return stats


async def chat_turns(port, model, rng):
    """Turn-2 TTFT with a cached prefix (turn 1 sent first) and without (fresh image, nothing cached)."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)

    def conv(url, answer=None):
        m = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "What is in this picture?"}]}]
        if answer is not None:
            m += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more about the colours."}]
        return m

    async def ttft(messages):
        """(ms to the first text, ms to the first chunk (the role: the request accepted), prompt / cached
        tokens from the usage chunk, the answer)."""
        p0 = prepare_ms(port)
        t0 = time.perf_counter()
        s = await client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True})
        first = chunk0 = usage = None
        text = ""
        async for c in s:
            chunk0 = chunk0 or time.perf_counter()
            if c.usage is not None:
                usage = c.usage
            if c.choices and c.choices[0].delta.content:
                first = first or time.perf_counter()
                text += c.choices[0].delta.content
        details = getattr(usage, "prompt_tokens_details", None)
        first = first or time.perf_counter()         # no text in 16 tokens: the whole answer's time
        p1 = prepare_ms(port)
        return {"ttft": (first - t0) * 1e3, "accepted": (chunk0 - t0) * 1e3,
                "server_prepare_ms": _prepare_delta(p0, p1),
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "cached_tokens": getattr(details, "cached_tokens", None)}, text

    import httpx
    raw = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600)

    async def raw_ttft(messages):
        """The same request as bytes encoded beforehand, on a kept-alive httpx connection: TTFT without the
        openai client's own cost of building and encoding a 4 MB body (the server's part, as on the wire)."""
        body = json.dumps({"model": model, "messages": messages, "max_tokens": 16, "temperature": 0.0,
                           "stream": True}).encode()
        p0 = prepare_ms(port)
        t0 = time.perf_counter()
        first = chunk0 = None
        async with raw.stream("POST", "/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"}) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk0 = chunk0 or time.perf_counter()
                if first is None and '"content":' in line and '"content":""' not in line:
                    first = time.perf_counter()
        first = first or time.perf_counter()
        p1 = prepare_ms(port)
        return {"ttft": (first - t0) * 1e3, "accepted": (chunk0 - t0) * 1e3,
                "server_prepare_ms": _prepare_delta(p0, p1),
                "prompt_tokens": None, "cached_tokens": None}

    runs = {"warm": [], "cold": [], "warm_raw": []}
    for _ in range(3):
        url = png_data_url(rng, 1024, 1024)
        _, answer = await ttft(conv(url))
        runs["warm"].append((await ttft(conv(url, answer)))[0])
        runs["warm_raw"].append(await raw_ttft(conv(url, answer)))
        runs["cold"].append((await ttft(conv(png_data_url(rng, 1024, 1024), answer)))[0])
    out = {k: float(np.median([r["ttft"] for r in v])) for k, v in runs.items()}
    out["runs"] = runs       # every turn's parts: where the time goes (accepted = host side before the engine)
    await client.close()
    await raw.aclose()
    return out


def start_server(model, port, max_batch, log, engine="process", kv_tokens=None, chunk_tokens=None,
                 prefill_schedule=None):
    cmd = [sys.executable, "-m", "pixtral_rt.serve", "--port", str(port), "--max-batch", str(max_batch),
           "--engine", engine,
           "--max-context", "32768", "--log-level", "warning"] + (["--model", model] if model else [])
    cmd += ["--kv-tokens", str(kv_tokens)] if kv_tokens else []
    cmd += ["--chunk-tokens", str(chunk_tokens)] if chunk_tokens else []
    cmd += ["--prefill-schedule", prefill_schedule] if prefill_schedule else []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(1200):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return proc
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see its log")
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy in 10 minutes")


def baseline_batch1(model, reqs, n_decode_tokens=256):
    """The same requests one at a time through the batch-1 engine; plus its decode rate on a 1k prompt."""
    import torch
    from pixtral_rt.engine import Engine
    from pixtral_rt.sampling import SamplingParams
    eng = Engine.load(model, progress=False, max_context=32768)   # the batch-1 engine (LLMEngine, max batch 1)
    t0, toks = time.perf_counter(), 0
    for m, k in reqs:
        toks += len(eng.generate(m, SamplingParams(max_tokens=k)).token_ids)
    rate = toks / (time.perf_counter() - t0)
    text = " ".join(np.random.default_rng(1).choice(WORDS, 800))
    res = eng.generate([{"role": "user", "content": text}], SamplingParams(max_tokens=n_decode_tokens))
    dec = res.timings["decode_tok_s"]
    eng.shutdown()             # stops its step thread, which holds the engine (and its GPU memory) alive
    del eng
    import gc
    gc.collect()
    torch.cuda.empty_cache()   # the server started next sizes its KV pool from free memory
    return rate, dec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the embedded random Pixtral-12B)")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default max(8, 3 x users))")
    ap.add_argument("--baseline-requests", type=int, default=12)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--engine", default="process,thread",
                    help="server engine modes to run, in order (process: step loop in its own process)")
    ap.add_argument("--log", default=os.path.join(os.environ.get("OUT", "/tmp"), "serve_server.log"))
    ap.add_argument("--no-max-tokens", action="store_true",
                    help="send requests without max_tokens; the client disconnects after the workload's length")
    ap.add_argument("--kv-tokens", type=int, help="the server's KV pool in tokens (small: preemption happens)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the batch-1 engine baseline")
    ap.add_argument("--chunk-tokens", type=int, help="the server's --chunk-tokens (default: the server's)")
    ap.add_argument("--prefill-schedule", choices=("fifo", "fair"),
                    help="the server's --prefill-schedule (default: the server's)")
    ap.add_argument("--chat-only", action="store_true",
                    help="only the turn-2 chat TTFT (cached prefix vs not), with its parts; implies --no-baseline")
    a = ap.parse_args()
    a.no_baseline = a.no_baseline or a.chat_only
    bw = copy_bandwidth_TBps() * 1e12 if not a.chat_only else float("nan")   # --chat-only runs on CPU too
    levels = [int(x) for x in a.levels.split(",")]
    reqs = workload(max(max(8, 3 * u) if not a.requests else a.requests for u in levels) + a.baseline_requests)
    if a.no_baseline:
        base_rate = base_dec = float("nan")
    else:
        base_rate, base_dec = baseline_batch1(a.model, reqs[:a.baseline_requests])
        print(f"batch-1 engine: {base_rate:.1f} output tok/s over {a.baseline_requests} requests one at a time; "
              f"decode {base_dec:.1f} tok/s at ~1k context", flush=True)
    for mode in a.engine.split(","):
        serve_mode(a, mode, levels, reqs, base_rate, base_dec, bw)


def _known(x):
    """None for NaN (a baseline skipped with --no-baseline): JSON lines stay strict JSON."""
    return None if x != x else x


def serve_mode(a, mode, levels, reqs, base_rate, base_dec, bw):
    import torch
    from pixtral_rt.config import PIXTRAL_12B
    from pixtral_rt.loading import decoder_weight_bytes, kv_bytes_per_token
    wbytes, kvtok = decoder_weight_bytes(PIXTRAL_12B), kv_bytes_per_token(PIXTRAL_12B)
    sfx = ("" if mode == "process" else f"@{mode}") + ("@no_max_tokens" if a.no_max_tokens else "") \
        + (f"@kv{a.kv_tokens}" if a.kv_tokens else "") + (f"@chunk{a.chunk_tokens}" if a.chunk_tokens else "") \
        + (f"@{a.prefill_schedule}" if a.prefill_schedule else "")
    nomax = a.no_max_tokens
    print(f"--- server engine: {mode}", flush=True)

    def record(bench, case, *rest, **kw):
        return _record(bench, case + sfx, *rest, engine=mode, no_max_tokens=nomax, kv_tokens=a.kv_tokens,
                       chunk_tokens=a.chunk_tokens, prefill_schedule=a.prefill_schedule, **kw)

    with open(a.log.replace(".log", f"_{mode}.log"), "w") as log:
        proc = start_server(a.model, a.port, max(levels), log, mode, a.kv_tokens, a.chunk_tokens,
                            a.prefill_schedule)
        try:
            model = "default"
            from openai import OpenAI
            model = OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="x").models.list().data[0].id
            if not a.chat_only:
                # batch-1 decode through the server: 1k prompt, 256 tokens, one user
                text = " ".join(np.random.default_rng(1).choice(WORDS, 800))
                st = asyncio.run(run_level(a.port, model, [([{"role": "user", "content": text}], 256)], 1, nomax))
                srv_dec = 1.0 / float(np.mean(st["itl"]))
                floor1 = bw / (wbytes + kvtok * 1100)
                record(BENCH, "batch1_decode_1k", "decode_tok_s", srv_dec, "tok/s", "batch-1 engine (same run)",
                       _known(base_dec), floor1, ratio_vs_baseline=_known(srv_dec / base_dec))
                for u in levels:
                    n = a.requests or max(8, 3 * u)
                    st = asyncio.run(run_level(a.port, model, reqs[a.baseline_requests:a.baseline_requests + n], u, nomax))
                    tps = st["tokens"] / st["wall"]
                    ctx = 700 + 1500 / 3 + 72          # mean prompt (text ~700, images add ~1/3 x 1500) + half output
                    floor = u * bw / (wbytes + u * kvtok * ctx)
                    ttft = np.percentile(st["ttft"], [50, 99]) * 1e3
                    itl = np.percentile(st["itl"], [50, 99]) * 1e3 if st["itl"] else [0, 0]
                    # steady state: without each user's first request (all users' first prompts arrive at once)
                    sd = st["steady"]
                    ttft_s = np.percentile(sd["ttft"], [50, 99]) * 1e3 if sd["ttft"] else [float("nan")] * 2
                    itl_s = np.percentile(sd["itl"], [50, 99]) * 1e3 if sd["itl"] else [float("nan")] * 2
                    mem = torch.cuda.mem_get_info(0)
                    extra = dict(users=u, requests=st["requests"], output_tokens=st["tokens"], wall_s=st["wall"],
                                 req_per_s=st["requests"] / st["wall"], ttft_p50_ms=ttft[0], ttft_p99_ms=ttft[1],
                                 itl_p50_ms=itl[0], itl_p99_ms=itl[1], gpu_mem_used_GiB=(mem[1] - mem[0]) / 2**30,
                                 decode_roofline_tok_s=floor, preemptions=st["preemptions"],
                                 peak_running=st["peak_running"], server_tokens=st["server_tokens"],
                                 steady_requests=sd["requests"], steady_ttft_p50_ms=_known(ttft_s[0]),
                                 steady_ttft_p99_ms=_known(ttft_s[1]), steady_itl_p50_ms=_known(itl_s[0]),
                                 steady_itl_p99_ms=_known(itl_s[1]))
                    record(BENCH, f"mixed_{u}_users", "output_tok_s", tps, "tok/s", "batch-1 engine, one request at a time",
                           _known(base_rate), floor, **extra)
                    print(f"  {u:3d} users: {tps:8.1f} tok/s ({tps / base_rate:.2f}x batch-1 engine, {tps / floor:.0%} of "
                          f"the decode roofline {floor:.0f}), TTFT p50/p99 {ttft[0]:.0f}/{ttft[1]:.0f} ms, "
                          f"ITL p50/p99 {itl[0]:.1f}/{itl[1]:.1f} ms, {st['preemptions']:.0f} preemptions, "
                          f"peak {st['peak_running']:.0f} running", flush=True)
                    print(f"       steady state ({sd['requests']} requests, each user's first left out): TTFT p50/p99 "
                          f"{ttft_s[0]:.0f}/{ttft_s[1]:.0f} ms, ITL p50/p99 {itl_s[0]:.1f}/{itl_s[1]:.1f} ms", flush=True)
                # aggregate decode: 64 short text prompts (~150 tokens), 256 output tokens each, all at once
                rng = np.random.default_rng(3)
                dec_reqs = [([{"role": "user", "content": " ".join(rng.choice(WORDS, 120))}], 256) for _ in range(max(levels))]
                st = asyncio.run(run_level(a.port, model, dec_reqs, max(levels), nomax))
                u = max(levels)
                floor = u * bw / (wbytes + u * kvtok * (150 + 128))
                itl = np.percentile(st["itl"], [50, 99]) * 1e3
                record(BENCH, f"decode_{u}_users", "output_tok_s", st["tokens"] / st["wall"], "tok/s",
                       "decode-step HBM roofline", floor, floor, users=u, itl_p50_ms=itl[0], itl_p99_ms=itl[1],
                       wall_s=st["wall"], output_tokens=st["tokens"], fraction_of_roofline=st["tokens"] / st["wall"] / floor,
                       preemptions=st["preemptions"], peak_running=st["peak_running"])
                print(f"  decode, {u} users at once: {st['tokens'] / st['wall']:.1f} tok/s, {st['preemptions']:.0f} "
                      f"preemptions, peak {st['peak_running']:.0f} running", flush=True)
                win = decode_window(st["streams"])      # all streams decoding: no prompt ramp, no tail
                if win:
                    record(BENCH, f"decode_{u}_users_steady", "output_tok_s", win["tok_s"], "tok/s",
                           "decode-step HBM roofline", floor, floor, users=u, window_s=win["window_s"],
                           itl_p50_ms=win["itl_p50_ms"], itl_p99_ms=win["itl_p99_ms"],
                           fraction_of_roofline=win["tok_s"] / floor)
                    print(f"  decode, all {u} streams decoding ({win['window_s']:.2f} s window): {win['tok_s']:.1f} tok/s "
                          f"({win['tok_s'] / floor:.0%} of the step roofline {floor:.0f}), ITL p50/p99 "
                          f"{win['itl_p50_ms']:.1f}/{win['itl_p99_ms']:.1f} ms", flush=True)
            t = asyncio.run(chat_turns(a.port, model, np.random.default_rng(7)))
            record(BENCH, "chat_turn2_1024_image", "ttft_ms", t["warm"], "ms", "same turn 2 without cached prefix",
                   t["cold"], None, ratio_vs_baseline=t["warm"] / t["cold"], runs=t["runs"], client="openai")
            record(BENCH, "chat_turn2_1024_image@raw_http", "ttft_ms", t["warm_raw"], "ms",
                   "same turn 2 through the openai client", t["warm"], None, ratio_vs_baseline=t["warm_raw"] / t["warm"],
                   client="httpx, body encoded beforehand")
            for k in ("warm", "warm_raw", "cold"):
                for r in t["runs"][k]:
                    prep = " ".join(f"{st} {v:.1f}" for st, v in r["server_prepare_ms"].items())
                    cached = (f", {r['cached_tokens']} of {r['prompt_tokens']} prompt tokens cached"
                              if r["prompt_tokens"] is not None else "")
                    print(f"  turn 2 {k}: TTFT {r['ttft']:.1f} ms, accepted after {r['accepted']:.1f} ms "
                          f"(server before the engine, ms: {prep}){cached}", flush=True)
        finally:
            proc.terminate()
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed"
            print(f"server exit code after SIGTERM: {rc}")


if __name__ == "__main__":
    main()
