"""`python -m pixtral_rt.serve` (or `pixtral-rt-serve`): the command line of the OpenAI-compatible HTTP server
(the app itself: serve_app.py).

    python -m pixtral_rt.serve --model ~/models/Pixtral-12B-2409 --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "Pixtral-12B-2409", "messages": [{"role": "user", "content": "Hi"}]}'

The order of work makes every mistake show in seconds, not after minutes of loading weights: the arguments,
then the serve extra (fastapi, uvicorn, prometheus-client; one line saying how to install it), then the
listening socket (a port in use, a host that is not this machine's), then the model, then serving on that
same socket. Nothing heavy is imported at module level (no fastapi, uvicorn, starlette or torch), so
`--help` works on an install without the serve extra.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import socket
import sys

from .. import image_cache
from ..cli_flags import add_runtime_flags, add_weight_flags, check_weight_flags, runtime_options

log = logging.getLogger("pixtral_rt.serve")

DEFAULT_MAX_BODY_MB = 64.0   # serve_app.DEFAULT_MAX_BODY_BYTES in MiB (not imported: serve_app imports fastapi)
LISTEN_BACKLOG = 2048        # uvicorn's default
SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")  # setup.py's SERVE_REQUIRES, by import name

# exit codes, listed in --help exactly as this table says
EXIT_STOPPED, EXIT_FAILURE, EXIT_USAGE, EXIT_NO_LISTEN, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = [
    (EXIT_STOPPED, "stopped by SIGTERM or Ctrl-C"),
    (EXIT_FAILURE, "runtime failure (loading failed for a reason other than the inputs, or the server failed)"),
    (EXIT_USAGE, "bad arguments, model folder or checkpoint, or the serve extra is not installed"),
    (EXIT_NO_LISTEN, "cannot listen on --host/--port (port in use, not an address of this machine, no "
                     "permission)"),
    (EXIT_INTERRUPTED, "Ctrl-C while the model was loading"),
]

EXAMPLES = """
examples:
  %(prog)s                      (the embedded random model: tiny on CPU, 12B on a GPU)
  %(prog)s --model ./Pixtral-12B-2409 --port 8000 --api-key "$KEY"
  %(prog)s --model ./Pixtral-12B-2409 --allowed-local-media-path /srv/images

Then: POST http://HOST:PORT/v1/chat/completions (OpenAI's API; any OpenAI client works), GET /v1/models,
GET /health, GET /metrics. A request parameter the server does not honour (tools, response_format,
penalties, logit_bias, ...) is refused with 400 naming it, unless its value changes nothing (e.g.
presence_penalty 0); unknown parameters too. SIGTERM or Ctrl-C stops it cleanly (exit code 0).
--host and --port are checked before the model loads (seconds, not minutes), as is the serve extra.
"""
EPILOG = EXAMPLES + "\nexit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pixtral_rt.serve",
        description="Serve a Pixtral-family model over an OpenAI-compatible HTTP API (chat completions with "
                    "images, streaming, logprobs), with continuous batching.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="DIR",
                   help="checkpoint folder (Mistral or HF layout); default: embedded random weights (a tiny "
                        "model on CPU, Pixtral-12B on a GPU) whose text is meaningless")
    m.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: the folder's name, or "
                        "random-<config> for the random default)")
    m.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="weight/activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    m.add_argument("--max-context", type=int, metavar="TOKENS",
                   help="longest prompt + answer in tokens (default: the model's, capped by GPU memory); "
                        "longer requests are refused with the counts")
    add_weight_flags(m)
    add_runtime_flags(m)
    m.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="requests decoded together at most (default 64)")
    m.add_argument("--engine", choices=["process", "thread"], default="process",
                   help="where the step loop runs: 'process' (default) = an engine process of its own, so HTTP "
                        "work never competes with it for the interpreter lock; 'thread' = a thread of this process")
    m.add_argument("--max-queue", type=int, default=1024, metavar="N",
                   help="requests waiting at most; one more is answered 503 (default 1024)")
    m.add_argument("--kv-tokens", type=int, metavar="TOKENS",
                   help="size of the KV page pool in tokens (default: GPU memory left after the weights, less "
                        "8 GiB; on CPU 4 full contexts); a small pool preempts requests more often")
    m.add_argument("--chunk-tokens", type=int, default=512, metavar="TOKENS",
                   help="prompt tokens computed per step while other requests decode (default 512; vLLM's "
                        "--max-num-batched-tokens plays this part): larger = new prompts start sooner and "
                        "prompt-heavy loads run faster, smaller = steadier token gaps for the streams decoding")
    m.add_argument("--prefill-schedule", choices=("fifo", "fair"), default="fifo",
                   help="how the --chunk-tokens budget of a step is shared among the prompts being computed while "
                        "others decode: fifo (default; oldest prompt first, as vLLM) or fair (equal shares, so a "
                        "new or short prompt starts at once instead of waiting behind a long one's whole prefill)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for all); "
                        "checked with --port before the model loads")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one, "
                                                         "logged)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                        "$PIXTRAL_RT_API_KEY if set, else no key; the variable keeps the key out of `ps`)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level; 'info' logs each request (default info)")
    r = p.add_argument_group("request limits and image security")
    r.add_argument("--max-images", type=int, default=12, metavar="N",
                   help="images per request at most; more are refused with 413 (default 12)")
    r.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                   help="request body size cap (base64 images included); larger gets 413 (default 64)")
    r.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let requests name local image files (paths or file:// URLs) inside DIR; without it "
                        "the server reads no local file. Symlinks and '..' are resolved first, so neither "
                        "leads out of DIR")
    r.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs reach loopback, private, link-local and cloud-metadata addresses "
                        "(refused by default, on every redirect too, so clients cannot probe your network)")
    r.add_argument("--image-cache-mb", type=int, default=512, metavar="MB",
                   help="decoded images kept by the digest of their encoded bytes, so an image a chat re-sends "
                        "(its history) is not base64-decoded or decoded again (default 512; 0: off)")
    return p


def _default_name(model: str | None, engine) -> str:
    if model:
        return os.path.basename(os.path.normpath(model))
    return engine.info["model"].replace(" ", "-")  # the random default: "random <preset>" -> "random-<preset>"


class ListenError(Exception):
    """The server cannot listen on --host:--port; the message says why and what to do."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening, opened before the model loads; uvicorn then serves this
    same socket, so no other process can take the port in between. It listens at once because only that
    holds the port: a socket merely bound with SO_REUSEADDR (as uvicorn binds) does not keep another one from
    binding beside it. Connections made while the model loads wait in the backlog until serving starts."""
    where = _address(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn: a host name listens on IPv4
    try:
        addr = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {where}: --host {host!r} is not a known name or address here "
                          f"({exc}); use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of "
                          "this machine's addresses") from exc
    # proto IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets
    # whose proto says TCP, and accepted sockets inherit it from this one. Without it a streamed chunk that
    # follows another unacknowledged one waits for the client's delayed ACK: ~40 ms on a kept-alive
    # connection before the first token (measured: role chunk yielded at +3 ms, received at +47 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {where}: {_why_not(exc, host)}") from exc
    return sock


def _why_not(exc: OSError, host: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use (another server?): stop that process or choose another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this machine: use 127.0.0.1 (this machine only), 0.0.0.0 (every "
                "interface) or one of this machine's own addresses")
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges): choose a --port of 1024 or more"
    return f"{exc.strerror or exc}"


def _missing_serve_extra() -> str | None:
    """None when the server's dependencies import, else one line saying what is missing and how to add it."""
    for module in SERVE_EXTRA:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return (f"the HTTP server needs the 'serve' extra, which is not installed ({exc}): pip install -e "
                    "'.[serve]' in a source checkout, or pip install 'pixtral_rt[serve]'")
    return None


def _torchrun_follower() -> bool:
    """A torchrun rank other than 0: it holds a shard and follows rank 0 from inside the engine load, never
    serves, so it must not take the port. tensor_parallel.torchrun_env's rule, not imported (torch)."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
            and int(os.environ["RANK"]) != 0)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Value checks argparse cannot express (parser.error: exit 2); returns the real path of the local media
    folder, or None."""
    for flag, value, low in (("--max-images", args.max_images, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 0), ("--max-context", args.max_context, 1),
                             ("--kv-tokens", args.kv_tokens, 1), ("--chunk-tokens", args.chunk_tokens, 1),
                             ("--image-cache-mb", args.image_cache_mb, 0)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    check_weight_flags(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not args.max_body_mb > 0:
        parser.error(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.allowed_local_media_path is None:
        return None
    root = os.path.realpath(os.path.expanduser(args.allowed_local_media_path))
    if not os.path.isdir(root):
        parser.error(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a folder")
    return root


def _load_engine(args: argparse.Namespace):
    from ..serving.engine_client import EngineClient
    from ..serving.llm_engine import LLMEngine
    engine_kind = args.engine
    if args.tensor_parallel > 1 and engine_kind == "process":
        # the engine process is daemonic and may not start the tensor-parallel workers: the engine runs
        # in this process (its workers are the other processes)
        log.info("--tensor-parallel %d: the engine runs in the server process (--engine thread)",
                 args.tensor_parallel)
        engine_kind = "thread"
    load = EngineClient.start if engine_kind == "process" else LLMEngine.load
    return load(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                max_images=args.max_images, max_batch=args.max_batch, max_queue=args.max_queue,
                quantization=args.quantization, random_weights=args.random_weights,
                tensor_parallel=args.tensor_parallel, kv_tokens=args.kv_tokens, chunk_tokens=args.chunk_tokens,
                prefill_schedule=args.prefill_schedule, options=runtime_options(args))


def _load_and_serve(args: argparse.Namespace, root: str | None, sock: socket.socket | None) -> int:
    """Load the model, then serve on `sock` until stopped. `sock` is None only on a torchrun follower,
    which never returns from the load."""
    from . import app as serve_app
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..errors import PixtralInputError
    from ..images import ImageLimits
    try:
        engine = _load_engine(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (PixtralInputError, CheckpointError, ConfigError) as exc:
        print(f"pixtral_rt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - one line for users; the traceback on request
        if os.environ.get("PIXTRAL_RT_DEBUG"):
            raise
        print(f"pixtral_rt: error ({type(exc).__name__}): {exc}  [set PIXTRAL_RT_DEBUG=1 for a traceback]",
              file=sys.stderr)
        return EXIT_FAILURE
    name = args.served_model_name or _default_name(args.model, engine)
    image_cache.CACHE.max_bytes = args.image_cache_mb << 20
    limits = ImageLimits(allow_local_files=root is not None, local_files_root=root,
                         allow_private_urls=args.allow_private_urls)
    api_key = args.api_key or os.environ.get("PIXTRAL_RT_API_KEY") or None
    app = serve_app.build_app(engine, name, api_key=api_key, max_images=args.max_images, image_limits=limits,
                              max_body_bytes=int(args.max_body_mb * 2**20))
    log.info("serving %r (%s) on http://%s; API key %s; local images %s; private image URLs %s", name,
             engine.info.get("device"), _address(args.host, sock.getsockname()[1]),
             "required" if api_key else "not required", f"from {root}" if root else "refused",
             "allowed" if args.allow_private_urls else "refused")
    try:
        serve_app.serve(app, sock, args.log_level)
    finally:
        engine.shutdown(timeout=serve_app.SHUTDOWN_GRACE_S)
    return EXIT_STOPPED


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = _check_args(parser, args)
    missing = _missing_serve_extra()
    if missing:
        print(f"pixtral_rt: error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..errors import route_image_warnings
    route_image_warnings(log.warning)   # an animated image: one warning line per request, no source line
    sock = None
    if not _torchrun_follower():
        try:
            sock = listen_socket(args.host, args.port)
        except ListenError as exc:
            print(f"pixtral_rt: error: {exc}", file=sys.stderr)
            return EXIT_NO_LISTEN
    try:
        return _load_and_serve(args, root, sock)
    finally:
        if sock is not None:
            sock.close()


if __name__ == "__main__":
    raise SystemExit(main())
