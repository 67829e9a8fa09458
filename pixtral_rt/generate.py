"""Command line: `python -m pixtral_rt.generate` — one-shot or interactive Pixtral generation.

    python -m pixtral_rt.generate --image photo.jpg --prompt "What is in this picture?"
    python -m pixtral_rt.generate --model ~/models/Pixtral-12B-2409 --chat
    python -m pixtral_rt.generate --json --max-tokens 32 --prompt "Hi"      # one JSON object on stdout

With no --model, an embedded random-weight model is used (Pixtral-12B on a GPU, a tiny one on CPU): it
exercises the whole runtime, but its text is meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .checkpoint import CheckpointError
from .cli_flags import add_weight_flags, check_weight_flags
from .config import ConfigError
from .errors import ImageSourceError, PixtralInputError

# bad input of any kind: one line on stderr, exit code 2, no traceback
_INPUT_ERRORS = (PixtralInputError, CheckpointError, ConfigError)

EXAMPLES = """
examples:
  %(prog)s --image cat.png --prompt "Describe the image."
  %(prog)s --model ./Pixtral-12B-2409 --image a.jpg --image https://example.com/b.png --prompt "Compare them."
  %(prog)s --model ./Pixtral-12B-2409 --chat          (then type; '/image PATH' attaches an image to your
                                                      next message, '/reset' clears history, '/quit' exits)
  %(prog)s --json --max-tokens 16 --prompt "Hello"

exit codes: 0 done, 2 bad input (file, image, request, arguments), 1 runtime failure, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pixtral_rt.generate",
        description="Run a Pixtral-family vision-language model (Pixtral-12B-2409, Pixtral-Large-Instruct-2411, "
                    "Mistral-Small-3.1-24B-2503) on text and images, streaming the answer.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="checkpoint folder, Mistral format (params.json + consolidated.safetensors) or "
                                   "HF format (config.json + model*.safetensors); default: embedded random weights")
    m.add_argument("--format", choices=["mistral", "hf"], help="force the checkpoint format (default: detect)")
    add_weight_flags(m)
    m.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="weight/activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    m.add_argument("--backend", choices=["auto", "serving", "fast", "reference"], default="auto",
                   help="serving (= auto) = the continuous-batching engine over a paged KV cache, as the server "
                        "runs it (Triton kernels + CUDA graphs on a GPU, the PyTorch reference on CPU; --chat turns "
                        "reuse the cached prefix); fast / reference = the earlier batch-1 engines (default: auto)")
    m.add_argument("--max-context", type=int, help="KV cache size in tokens (default: the model's, capped by GPU "
                                                   "memory); longer requests are refused up front")
    m.add_argument("--max-images", type=int, default=12, help="images allowed per request (default 12)")
    m.add_argument("--no-graphs", action="store_true", help="run without CUDA graphs (debugging)")
    r = p.add_argument_group("request")
    r.add_argument("--prompt", help="user message text (read from stdin if omitted and not --chat)")
    r.add_argument("--image", action="append", default=[], metavar="SRC",
                   help="image path, http(s) URL or data:image/...;base64 URL; repeat for several images")
    r.add_argument("--system", help="system prompt")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic (default 0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
    s.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    o = p.add_argument_group("output")
    o.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    o.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and timings")
    o.add_argument("--quiet", action="store_true", help="no progress bars or timing summary on stderr")
    return p


def _user_message(text: str, images: list[str]) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _as_url(src)}} for src in images]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _as_url(src: str) -> str:
    return src if "://" in src or src.startswith("data:") else os.path.abspath(os.path.expanduser(src))


def _summary(engine, res) -> str:
    t = res.timings
    # TTFT = encode (host: images, tokens) + queue + vision encoder + prefill (+ delivery of the first token)
    return (f"[{engine.info['backend']} | {engine.info['device']} | {res.prompt_tokens} prompt tokens, "
            f"{res.n_images} image(s), {res.image_patches} patches | TTFT {t.get('ttft_ms', 0):.1f} ms = encode "
            f"{t.get('encode_ms', 0):.1f} + queue {t.get('queue_ms', 0):.1f} + vision {t.get('vision_ms', 0):.1f} "
            f"+ prefill {t.get('prefill_ms', 0):.1f} ms | decode {t.get('decode_tok_s', 0):.1f} tok/s "
            f"({t.get('decode_GBps', 0):.0f} GB/s), {len(res.token_ids)} tokens, {res.finish_reason}]")


def _json_record(engine, res) -> dict:
    t = dict(res.timings)
    t["load_s"] = engine.info["load_s"]
    return {"model": engine.info["model"], "format": engine.info["format"], "device": engine.info["device"],
            "dtype": engine.info["dtype"], "backend": engine.info["backend"],
            "quantization": engine.info.get("quantization"), "precision": engine.info.get("precision"),
            "tensor_parallel": engine.info.get("tensor_parallel", 1), "random_weights": engine.info["random_weights"], "prompt_tokens": res.prompt_tokens,
            "n_images": res.n_images, "image_patches": res.image_patches, "generated_token_ids": res.token_ids,
            "text": res.text, "finish_reason": res.finish_reason, "timings": t}


def _run_turn(engine, messages, params, args) -> object:
    """Stream one answer to stdout (or collect it for --json). Ctrl-C keeps what was printed."""
    try:
        for piece in engine.stream(messages, params):
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        if not args.json:
            sys.stdout.write("\n")
        print("pixtral_rt: interrupted; output above is what was generated", file=sys.stderr)
        raise
    res = engine.last
    if args.json:
        print(json.dumps(_json_record(engine, res)))
    else:
        sys.stdout.write("\n")
        if not args.quiet:
            print(_summary(engine, res), file=sys.stderr)
    return res


def _chat_loop(engine, params, args) -> None:
    history = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    pending = list(args.image)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            pending = []
            print("pixtral_rt: history cleared", file=sys.stderr)
            continue
        if line.startswith("/image "):
            pending.append(line[len("/image "):].strip())
            print(f"pixtral_rt: image attached to your next message ({len(pending)} pending)", file=sys.stderr)
            continue
        msg = _user_message(line, pending)
        try:
            res = _run_turn(engine, history + [msg], params, args)
        except _INPUT_ERRORS as exc:  # a bad image in one turn must not end the session
            print(f"pixtral_rt: error: {exc}", file=sys.stderr)
            pending = []
            continue
        pending = []
        history += [msg, {"role": "assistant", "content": res.text}]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .sampling import SamplingParams
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, stop=tuple(args.stop))
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_images < 0:
        parser.error(f"--max-images must be >= 0, got {args.max_images}")
    check_weight_flags(parser, args)
    if args.max_context is not None and args.max_context < 1:
        parser.error(f"--max-context must be >= 1, got {args.max_context}")
    if args.quiet or args.json:
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from .engine import Engine
        for src in args.image:  # fail on a missing local file before spending time loading the model
            if "://" not in src and not src.startswith("data:") and not os.path.isfile(os.path.expanduser(src)):
                raise ImageSourceError(f"--image {src!r}: no such file")
        prompt = args.prompt
        if prompt is None and not args.chat:
            if sys.stdin.isatty():
                parser.error("give --prompt TEXT (or --chat for an interactive session)")
            prompt = sys.stdin.read().strip()
            if not prompt:
                parser.error("empty prompt on stdin: give --prompt TEXT")
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                             max_images=args.max_images, backend=args.backend, fmt=args.format,
                             progress=not (args.quiet or args.json), use_graphs=not args.no_graphs,
                             quantization=args.quantization, random_weights=args.random_weights,
                             tensor_parallel=args.tensor_parallel)
        if args.chat:
            _chat_loop(engine, params, args)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [_user_message(prompt, args.image)]
            _run_turn(engine, messages, params, args)
        return 0
    except KeyboardInterrupt:
        return 130
    except _INPUT_ERRORS as exc:
        print(f"pixtral_rt: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for users; the traceback on request
        if os.environ.get("PIXTRAL_RT_DEBUG"):
            raise
        kind = "out of GPU memory" if "out of memory" in str(exc).lower() else type(exc).__name__
        print(f"pixtral_rt: error ({kind}): {exc}  [set PIXTRAL_RT_DEBUG=1 for a traceback]", file=sys.stderr)
        return 1



if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` must not print a BrokenPipe traceback
    raise SystemExit(main())
