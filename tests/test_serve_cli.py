"""`python -m pixtral_rt.serve` before any model is loaded: --help on an install without the serve extra, the
one-line message when that extra is missing, and a taken port or a foreign --host refused in seconds with the
exit code --help documents. Each run gets an empty PIXTRAL_RT_CACHE: the random default model would write its
checkpoint there, so an empty folder afterwards proves the model was never loaded. Only 127.0.0.1 (and the
documentation address 192.0.2.1, which is bound to, never contacted) is used."""
from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pixtral_rt.server import cli as serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs the CLI (`-m pixtral_rt.serve`, or the pixtral-rt-serve console script's entry point) with some
# top-level packages made unimportable, as if they were not installed
BLOCKED_RUN = textwrap.dedent("""
    import importlib.metadata, runpy, sys
    how, BLOCKED = sys.argv[1], set(sys.argv[2].split(","))

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    sys.argv = ["pixtral_rt.serve", *sys.argv[3:]]
    if how == "module":
        runpy.run_module("pixtral_rt.serve", run_name="__main__", alter_sys=True)
    else:
        (main,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == how]
        raise SystemExit(main.load()())
""")


def _env(cache) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PIXTRAL_RT_DEBUG", "RANK", "WORLD_SIZE")}
    env["PIXTRAL_RT_CACHE"] = str(cache)
    return env


def _serve(args, cache, blocked=(), how="module", timeout=120) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-c", BLOCKED_RUN, how, ",".join(blocked), *args] if blocked else \
        [sys.executable, "-m", "pixtral_rt.serve", *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pixtral_rt: error: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ no serve extra
def test_help_needs_neither_the_serve_extra_nor_torch(tmp_path):
    for how in ("module", "pixtral-rt-serve"):   # python -m pixtral_rt.serve, and the console script
        r, _ = _serve(["--help"], tmp_path, how=how,
                      blocked=("fastapi", "uvicorn", "starlette", "prometheus_client", "torch"))
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and r.stdout.startswith("usage: python -m pixtral_rt.serve")
        assert "--port" in r.stdout and "exit codes:" in r.stdout


def test_a_start_without_the_serve_extra_is_one_line_and_exit_2(tmp_path):
    for missing in ("uvicorn", "fastapi"):
        r, _ = _serve(["--device", "cpu", "--port", "0"], tmp_path, blocked=(missing,))
        assert r.returncode == serve.EXIT_USAGE == 2, r.stderr
        line = _one_error_line(r)
        assert "pip install -e '.[serve]'" in line and "pip install 'pixtral_rt[serve]'" in line, line
        assert repr(missing) in line and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ exit codes
def test_help_lists_the_exit_codes_main_returns(capsys):
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    text = capsys.readouterr().out
    for code, what in serve.EXIT_CODES:
        assert f"  {code:<4} {what}\n" in text, (code, what)
    assert [c for c, _ in serve.EXIT_CODES] == [serve.EXIT_STOPPED, serve.EXIT_FAILURE, serve.EXIT_USAGE,
                                                 serve.EXIT_NO_LISTEN, serve.EXIT_INTERRUPTED]


def test_cli_body_cap_default_is_the_apps():
    from pixtral_rt.server.app import DEFAULT_MAX_BODY_BYTES
    assert serve.DEFAULT_MAX_BODY_MB * 2**20 == DEFAULT_MAX_BODY_BYTES


# ------------------------------------------------------------------------------------------ listening
def test_a_taken_port_is_refused_before_the_model_loads(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r, seconds = _serve(["--device", "cpu", "--host", "127.0.0.1", "--port", str(port)], tmp_path)
    assert r.returncode == serve.EXIT_NO_LISTEN == 3, r.stderr
    line = _one_error_line(r)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "already in use" in line and "--port" in line, line
    assert list(tmp_path.iterdir()) == [] and "loading" not in (r.stdout + r.stderr).lower()
    assert seconds < 60  # imports only; the model load (tens of seconds on CPU) never began


def test_a_host_that_is_not_this_machine_is_refused_before_the_model_loads(tmp_path):
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no machine's address: bind fails at once, nothing is sent
    r, _ = _serve(["--device", "cpu", "--host", "192.0.2.1", "--port", "0"], tmp_path)
    assert r.returncode == serve.EXIT_NO_LISTEN, r.stderr
    line = _one_error_line(r)
    assert "cannot listen on 192.0.2.1:0" in line and "not an address of this machine" in line, line
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_host_name_is_named(monkeypatch):
    def unknown(*args, **kwargs):  # in place of the resolver: no DNS query leaves this machine
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(serve.ListenError, match=r"cannot listen on nosuch\.invalid:8000: --host 'nosuch\.invalid' "
                                                r"is not a known name or address here"):
        serve.listen_socket("nosuch.invalid", 8000)


def test_the_listening_socket_holds_the_port():
    sock = serve.listen_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(serve.ListenError, match="already in use"):  # held from the start, SO_REUSEADDR or not
            serve.listen_socket("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # accepted into the backlog already
            pass
    finally:
        sock.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_accepted_connections_turn_nagle_off(loop):
    """uvicorn serves the socket through asyncio (or uvloop, its default when installed: the serve extra
    installs it); asyncio sets TCP_NODELAY on an accepted connection only when the listening socket's proto
    is IPPROTO_TCP (asyncio.base_events._set_nodelay). With Nagle on, a streamed chunk behind an
    unacknowledged one waits for the client's delayed ACK (~40 ms before the first token on a kept-alive
    connection). Both the accepted socket's option and the event loop's path are checked."""
    import asyncio
    new_loop = asyncio.new_event_loop
    if loop == "uvloop":
        new_loop = pytest.importorskip("uvloop", reason="uvloop comes with the serve extra ('.[serve]')").new_event_loop
    sock = serve.listen_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    seen = []

    async def main():
        async def handle(reader, writer):
            s = writer.get_extra_info("socket")
            seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            await reader.read()              # the handler has run and closed the connection
            writer.close()

    ev = new_loop()
    try:
        ev.run_until_complete(main())
    finally:
        ev.close()
        sock.close()
    assert seen and seen[0] != 0, "Nagle is on for accepted connections: streamed chunks wait for delayed ACKs"


@pytest.mark.parametrize("env", [{}, {"RANK": "0", "WORLD_SIZE": "2"}, {"RANK": "1", "WORLD_SIZE": "2"},
                                 {"RANK": "1", "WORLD_SIZE": "1"}, {"RANK": "3"}])
def test_torchrun_followers_do_not_take_the_port(env, monkeypatch):
    from pixtral_rt.tensor_parallel import torchrun_env
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    follower = torchrun_env() is not None and torchrun_env()[0] != 0
    assert serve._torchrun_follower() == follower
