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
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError
from .cli_flags import add_weight_flags, check_weight_flags
from .config import ConfigError
from .errors import PixtralInputError, route_image_warnings

# bad input of any kind: one line on stderr, exit code 2, no traceback
_INPUT_ERRORS = (PixtralInputError, CheckpointError, ConfigError)

EXAMPLES = """
examples:
  %(prog)s --image cat.png --prompt "Describe the image."
  %(prog)s --model ./Pixtral-12B-2409 --image a.jpg --image https://example.com/b.png --prompt "Compare them."
  %(prog)s --model ./Pixtral-12B-2409 --chat          (then type; '/image PATH' attaches an image to your
                                                      next message, '/reset' clears history, '/help' lists
                                                      the commands, '/quit' exits)
  %(prog)s --json --max-tokens 16 --prompt "Hello"

The answer always streams: tokens are printed as they come (--json prints one object at the end instead).
Ctrl-C stops an answer and keeps what was printed; in --chat the session goes on (the partial answer stays
in the conversation), and Ctrl-C at the prompt, Ctrl-D or /quit ends it.

exit codes: 0 done (--chat: also when ended by Ctrl-C at the prompt), 2 bad input (file, image, request,
arguments, --device), 1 runtime failure, 130 interrupted (a one-shot answer, or the model load).
"""

# --chat: the one-line reminder printed at the start, and /help
COMMAND_NAMES = "/image PATH, /reset, /help, /quit"
CHAT_COMMANDS = f"commands: {COMMAND_NAMES}; Ctrl-C stops an answer, Ctrl-C at the prompt quits"
CHAT_HELP = f"""{CHAT_COMMANDS}
  /image SRC   attach an image to your next message: a local path (checked now), an http(s) or data: URL
               (checked when sent); repeat for several images
  /reset       clear the conversation and the images not sent yet
  /help        this list
  /quit        end the session (also /exit, Ctrl-D, or Ctrl-C at the prompt; exit code 0)
  //text       a message that starts with '/': '//text' sends '/text' (any other line starting with '/' is
               a command)
  Ctrl-C during an answer stops it; the part already printed stays in the conversation"""


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
    s.add_argument("--seed", type=int, help="sampling seed (same seed, same output); default: a fresh random seed "
                                            "each run, reported as \"seed\" in --json output and in the summary "
                                            "line, so a run can be repeated with --seed N")
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


def _summary(engine, res, seed: int | None = None) -> str:
    """seed: shown when sampling (None for greedy decoding, where it changes nothing)."""
    t = res.timings
    # TTFT = encode (host: images, tokens) + queue + vision encoder + prefill (+ delivery of the first token)
    return (f"[{engine.info['backend']} | {engine.info['device']} | {res.prompt_tokens} prompt tokens, "
            f"{res.n_images} image(s), {res.image_patches} patches | TTFT {t.get('ttft_ms', 0):.1f} ms = encode "
            f"{t.get('encode_ms', 0):.1f} + queue {t.get('queue_ms', 0):.1f} + vision {t.get('vision_ms', 0):.1f} "
            f"+ prefill {t.get('prefill_ms', 0):.1f} ms | decode {t.get('decode_tok_s', 0):.1f} tok/s "
            f"({t.get('decode_GBps', 0):.0f} GB/s), {len(res.token_ids)} tokens, {res.finish_reason}"
            + (f", seed {seed}" if seed is not None else "") + "]")


def _json_record(engine, res, seed: int) -> dict:
    t = dict(res.timings)
    t["load_s"] = engine.info["load_s"]
    return {"model": engine.info["model"], "format": engine.info["format"], "device": engine.info["device"],
            "dtype": engine.info["dtype"], "backend": engine.info["backend"],
            "quantization": engine.info.get("quantization"), "precision": engine.info.get("precision"),
            "tensor_parallel": engine.info.get("tensor_parallel", 1), "random_weights": engine.info["random_weights"], "prompt_tokens": res.prompt_tokens,
            "n_images": res.n_images, "image_patches": res.image_patches, "generated_token_ids": res.token_ids,
            "text": res.text, "finish_reason": res.finish_reason, "seed": seed, "timings": t}


def _checked_image(src: str) -> str:
    """`src` as it will be sent (a local path made absolute), with a local file's header read now: a missing,
    unreadable or non-image file is reported before the model loads (--image) or when it is attached
    (/image), not at the next message. http(s) and data: URLs are checked when sent (no download twice)."""
    if src.lower().startswith(("http://", "https://", "data:")):
        return src
    from .images import open_image
    url = _as_url(src)
    open_image(url if "://" in url else Path(url))  # a Path: never mistaken for raw base64 or a URL
    return url


def _warning_printer():
    """An emit function for route_image_warnings: one 'pixtral_rt: warning: ...' line per distinct message
    (an image is opened by the early check and again on every chat turn that has it in its history)."""
    seen: set[str] = set()

    def emit(message: str) -> None:
        if message not in seen:
            seen.add(message)
            print(f"pixtral_rt: warning: {message}", file=sys.stderr, flush=True)
    return emit


def _run_turn(engine, messages, params, args):
    """Stream one answer to stdout (--json: one object at the end instead). Ctrl-C stops the answer: what
    was generated stays printed and is returned, with finish_reason "interrupted"."""
    from .engine import GenerationResult
    engine.last = None  # an interrupt before the engine starts must not report the previous turn
    pieces = engine.stream(messages, params)
    stopped = False
    try:
        for piece in pieces:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stopped = True
        pieces.close()  # cancels the request (frees its KV pages) when the interrupt hit between two pieces
    res = engine.last or GenerationResult()
    if stopped:
        res.finish_reason = "interrupted"
    if args.json:
        print(json.dumps(_json_record(engine, res, params.seed)), flush=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(_summary(engine, res, None if params.greedy else params.seed), file=sys.stderr, flush=True)
    return res


def parse_chat_line(line: str) -> tuple[str | None, str]:
    """A --chat input line -> (command, its argument) for '/word ...', (None, message text) otherwise.
    Any line whose first non-blank character is a single '/' is a command, so a mistyped one is never sent
    to the model; '//' escapes a message that starts with '/' ('//etc/hosts' sends '/etc/hosts')."""
    stripped = line.strip()
    if stripped.startswith("//"):
        return None, line.lstrip()[1:]
    if stripped.startswith("/"):
        word, _, arg = stripped.partition(" ")
        return word.lower(), arg.strip()
    return None, line


@dataclass
class _Chat:
    """A --chat session's state: the conversation so far and the images for the next message."""
    system: str | None
    pending: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        self.history, self.pending = [], []


def _chat_loop(engine, params, args) -> None:
    """Turns on stdin until EOF, /quit or Ctrl-C at the prompt (all exit 0: nothing is cut short)."""
    chat = _Chat(args.system, list(args.image))
    print(f"pixtral_rt: {CHAT_COMMANDS}", file=sys.stderr, flush=True)
    interactive = sys.stdin.isatty()
    try:
        while _chat_step(engine, chat, params, args, interactive):
            pass
    except KeyboardInterrupt:  # at the prompt (an answer's own Ctrl-C is handled by _run_turn)
        if interactive:
            print(file=sys.stderr)


def _chat_step(engine, chat: _Chat, params, args, interactive: bool) -> bool:
    """Read one line and act on it; False when the session ends (EOF or /quit)."""
    if interactive:
        print("you> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        return False
    command, text = parse_chat_line(line.rstrip("\n"))
    if command is not None:
        return _chat_command(chat, command, text)
    if text.strip():
        _chat_turn(engine, chat, text, params, args)
    return True


def _chat_error(message: str) -> None:
    print(f"pixtral_rt: error: {message}", file=sys.stderr, flush=True)


def _chat_command(chat: _Chat, command: str, arg: str) -> bool:
    """Run one /command; False for /quit."""
    if command == "/image":
        _attach_image(chat, arg)
        return True
    if command not in ("/quit", "/exit", "/reset", "/help"):
        _chat_error(f"unknown command {command!r} (nothing was sent): the commands are {COMMAND_NAMES}; "
                    "to send a message that starts with '/', begin it with '//'")
        return True
    if arg:
        _chat_error(f"{command} takes no argument, got {arg!r}")
        return True
    if command in ("/quit", "/exit"):
        return False
    if command == "/reset":
        chat.reset()
        print("pixtral_rt: history cleared", file=sys.stderr, flush=True)
    else:
        print(CHAT_HELP, file=sys.stderr, flush=True)
    return True


def _attach_image(chat: _Chat, src: str) -> None:
    if not src:
        _chat_error("/image needs a source: /image PATH (or an http(s) or data: URL)")
        return
    try:
        chat.pending.append(_checked_image(src))
    except PixtralInputError as exc:
        _chat_error(f"{exc} (not attached)")
        return
    print(f"pixtral_rt: image attached to your next message ({len(chat.pending)} pending)", file=sys.stderr,
          flush=True)


def _chat_turn(engine, chat: _Chat, text: str, params, args) -> None:
    """One question and its answer. A stopped answer stays in the history as far as it got (as vLLM's and
    ollama's chats keep it), so the next question can refer to it. An answer with no text at all (stopped
    before its first token, or an immediate end of sequence) is dropped together with its question: the chat
    format refuses an empty assistant message, so keeping it would make every later turn fail."""
    msg = _user_message(text, chat.pending)
    chat.pending = []
    try:
        res = _run_turn(engine, chat.messages() + [msg], params, args)
    except _INPUT_ERRORS as exc:  # a bad image URL or an over-long request must not end the session
        _chat_error(str(exc))
        return
    if res.finish_reason == "interrupted":
        kept = "it stays in the conversation as far as it got" if res.text else "nothing was kept"
        print(f"pixtral_rt: answer stopped (Ctrl-C); {kept}. Ctrl-C at the prompt quits", file=sys.stderr,
              flush=True)
    if res.text:
        chat.history += [msg, {"role": "assistant", "content": res.text}]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # no --seed: a fresh one per run (as the server draws one per request), reported so it can be repeated
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    try:
        from .sampling import SamplingParams
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=seed,
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
    route_image_warnings(_warning_printer())
    try:
        from .engine import Engine
        # a bad local image fails before time is spent loading the model
        args.image = [_checked_image(src) for src in args.image]
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
            return 0
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [_user_message(prompt, args.image)]
        if _run_turn(engine, messages, params, args).finish_reason == "interrupted":
            print("pixtral_rt: interrupted; output above is what was generated", file=sys.stderr)
            return 130
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
