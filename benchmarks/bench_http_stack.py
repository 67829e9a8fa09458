"""The HTTP side's CPU per streamed token (issue 21 item 3): uvicorn on httptools + uvloop (what the serve extra
installs and uvicorn picks) against h11 + asyncio (PIXTRAL_RT_BENCH_HTTP_STACK=h11), in the same run.

Each stack: a server (`python -m pixtral_rt.serve --engine process`, the tiny model on the CPU by default:
the engine's speed does not enter the figure), `--streams` streaming requests at once of exactly `--tokens`
tokens each through raw httpx (a cheap client); the figure is the server process's CPU time (utime + stime,
the engine process not included) over the timed requests divided by the text chunks streamed, request
parsing and encoding included. Alternating runs (`--rounds`), the median per stack. No floor: it is host
cost, not a device limit.

    python benchmarks/bench_http_stack.py [--streams 64] [--tokens 60] [--rounds 2] [--device cpu]
    python benchmarks/bench_http_stack.py --baseline-tree DIR [--baseline-commit SHA]

--baseline-tree: instead of the two stacks, this tree's server against the server of an older tree (a
`git archive` of it; httptools + uvloop both), alternating in the same run: the figure of a change to the
HTTP side, with its own baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import record  # noqa: E402

STACKS = {"httptools+uvloop": {}, "h11+asyncio": {"PIXTRAL_RT_BENCH_HTTP_STACK": "h11"}}


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _streams(port: int, n: int, tokens: int) -> int:
    import httpx

    async def one(c, i) -> int:
        body = {"messages": [{"role": "user", "content": f"story {i} " * 20}], "max_tokens": tokens,
                "min_tokens": tokens, "stream": True, "temperature": 0.0}
        k = 0
        async with c.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    k += 1
        return k
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as c:
        return sum(await asyncio.gather(*[one(c, i) for i in range(n)]))


def measure(stack_env: dict, a, port: int, tree: str | None = None) -> tuple[float, int]:
    """(us of server CPU per streamed chunk, chunks) for one server with this stack (from `tree` if given)."""
    import httpx
    env = dict(os.environ, **stack_env)
    if tree:
        env["PYTHONPATH"] = os.path.abspath(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pixtral_rt.serve", "--port", str(port), "--device", a.device, "--max-batch",
           str(a.streams), "--engine", "process", "--max-context", "2048", "--log-level", "warning"]
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "http_stack_server.log"), "a") as log:
        srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=os.path.abspath(tree) if tree else None)
        try:
            for _ in range(1200):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if srv.poll() is not None:
                    raise SystemExit(f"bench_http_stack: the server exited ({srv.returncode}); see its log")
                time.sleep(0.5)
            asyncio.run(_streams(port, 4, a.tokens))                  # warm-up
            c0 = _cpu_s(srv.pid)
            chunks = asyncio.run(_streams(port, a.streams, a.tokens))
            used = _cpu_s(srv.pid) - c0
        finally:
            srv.terminate()
            srv.wait(60)
    # a chunk carries one token's text, or a few when a character spans tokens (the detokenizer holds them)
    if chunks < a.streams * a.tokens * 0.9:
        raise SystemExit(f"bench_http_stack: {chunks} text chunks streamed for {a.streams * a.tokens} tokens")
    return used / chunks * 1e6, chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="the server's --device (default cpu: the tiny model)")
    ap.add_argument("--port", type=int, default=18123)
    ap.add_argument("--baseline-tree", help="an older tree's server as the baseline instead of h11 + asyncio")
    ap.add_argument("--baseline-commit", default="baseline", help="its commit, for the result rows")
    a = ap.parse_args()
    if a.baseline_tree:
        if not os.path.isdir(os.path.join(a.baseline_tree, "pixtral_rt")):
            ap.error(f"--baseline-tree {a.baseline_tree}: no pixtral_rt/ there")
        runs = {"this tree": (STACKS["httptools+uvloop"], None),
                f"tree {a.baseline_commit}": (STACKS["httptools+uvloop"], a.baseline_tree)}
        base_name, base_label = f"tree {a.baseline_commit}", f"server of {a.baseline_commit}, same stack (same run)"
    else:
        runs = {name: (env, None) for name, env in STACKS.items()}
        base_name, base_label = "h11+asyncio", "h11+asyncio (same run)"
    got = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, (env, tree) in runs.items():
            us, _n = measure(env, a, a.port, tree)
            got[name].append(us)
            print(f"  {name}: {us:.1f} us of server CPU per chunk", flush=True)
    base = float(np.median(got[base_name]))
    for name, v in got.items():
        if a.baseline_tree and name == base_name:
            continue
        case = f"{'httptools+uvloop' if a.baseline_tree else name} {a.streams} streams x {a.tokens} tokens"
        record("http_stack", case, "server_cpu_per_chunk", float(np.median(v)), "us", base_label, base, None,
               runs=[round(x, 1) for x in v], baseline_runs=[round(x, 1) for x in got[base_name]],
               server_device=a.device)


if __name__ == "__main__":
    main()
