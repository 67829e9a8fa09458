"""`python -m pixtral_rt.generate` end to end on CPU with the embedded tiny random model."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ctrl_c_default


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["PIXTRAL_RT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e.pop("PIXTRAL_RT_DEBUG", None)
    return e


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    a = d / "a.png"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(a)
    b = d / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (120, 20, 3), dtype=np.uint8)).save(b)
    bad = d / "corrupt.png"
    bad.write_bytes(b"<html>this is not a png</html>")
    gif = d / "anim.gif"
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)).convert("P") for v in (10, 200, 90)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    folder = d / "folder"
    folder.mkdir()
    return {"a": str(a), "b": str(b), "bad": str(bad), "gif": str(gif), "dir": str(folder)}


def run(env, *argv, stdin=None, timeout=300):
    p = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--device", "cpu", *argv], input=stdin,
                       capture_output=True, text=True, env=env, timeout=timeout)
    return p


def js(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_text_only_json_fields_are_sane(env):
    r = js(run(env, "--json", "--max-tokens", "5", "--prompt", "Hello there"))
    for key in ("model", "format", "device", "dtype", "prompt_tokens", "image_patches", "generated_token_ids",
                "text", "timings", "seed"):
        assert key in r, key
    assert r["format"] == "mistral" and r["device"] == "cpu" and r["random_weights"] is True
    assert r["image_patches"] == 0 and r["prompt_tokens"] > 3
    assert len(r["generated_token_ids"]) == 5 and all(0 <= t < 131072 for t in r["generated_token_ids"])
    for k in ("load_s", "vision_ms", "ttft_ms", "decode_tok_s", "decode_GBps"):
        assert r["timings"][k] >= 0, k
    assert r["timings"]["decode_tok_s"] > 0 and r["timings"]["ttft_ms"] > 0


def test_greedy_is_deterministic_and_streams_the_json_text(env):
    a = js(run(env, "--json", "--max-tokens", "6", "--prompt", "Same prompt"))
    b = run(env, "--max-tokens", "6", "--prompt", "Same prompt", "--quiet")
    assert b.returncode == 0, b.stderr
    assert b.stdout == a["text"] + "\n"  # streamed text == the final text


def test_one_image(env, images):
    r = js(run(env, "--json", "--max-tokens", "3", "--image", images["a"], "--prompt", "What is this?"))
    # 53x37 px with 16 px patches -> 4 cols x 3 rows = 12 patches
    assert r["n_images"] == 1 and r["image_patches"] == 12
    assert r["prompt_tokens"] > 12 + 3


def test_two_images_and_sampling_flags(env, images):
    r = js(run(env, "--json", "--max-tokens", "4", "--image", images["a"], "--image", images["b"], "--temperature",
               "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3", "--prompt", "Compare"))
    assert r["n_images"] == 2 and r["image_patches"] == 12 + 8 * 2
    again = js(run(env, "--json", "--max-tokens", "4", "--image", images["a"], "--image", images["b"],
                   "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3", "--prompt", "Compare"))
    assert again["generated_token_ids"] == r["generated_token_ids"]


def test_chat_through_stdin(env, images):
    script = f"Hello\n/image {images['a']}\nWhat is in the image?\n/quit\n"
    p = run(env, "--chat", "--max-tokens", "3", "--json", stdin=script)
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(turns) == 2
    assert turns[0]["n_images"] == 0 and turns[1]["n_images"] == 1
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + 12  # history + image tokens


def test_chat_survives_a_bad_image(env, images):
    # a bad file is refused when attached; a bad data: URL (checked when sent) fails its turn only
    script = f"/image {images['bad']}\nlook\n/image data:image/png;base64,AAAA\nstill there?\nand now?\n"
    p = run(env, "--chat", "--max-tokens", "2", "--json", stdin=script)
    assert p.returncode == 0, p.stderr
    assert "not a recognised image" in p.stderr or "corrupt" in p.stderr.lower()
    assert "data:image/png;base64,AAAA" in p.stderr
    assert len([line for line in p.stdout.splitlines() if line.strip()]) == 2


@pytest.mark.parametrize("case", ["missing", "corrupt", "too-many", "bad-flag", "raw-base64"])
def test_bad_inputs_one_line_error_no_traceback(env, images, case):
    argv = {
        "missing": ["--image", "/nonexistent/photo.jpg", "--prompt", "x"],
        "corrupt": ["--image", images["bad"], "--prompt", "x"],
        "too-many": ["--max-images", "1", "--image", images["a"], "--image", images["b"], "--prompt", "x"],
        "bad-flag": ["--temperature", "-1", "--prompt", "x"],
        "raw-base64": ["--image", "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk", "--prompt", "x"],
    }[case]
    p = run(env, *argv)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    err = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(err) == 1, p.stderr
    needle = {"missing": "/nonexistent/photo.jpg", "corrupt": "corrupt.png", "too-many": "2 images",
              "bad-flag": "temperature", "raw-base64": "iVBORw0KGgo"}[case]
    assert needle in err[0], err[0]


def test_context_overflow_refused_with_counts(env):
    p = run(env, "--max-context", "16", "--max-tokens", "8", "--prompt", "a b c d e f g h i j k")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "16" in p.stderr and "max_tokens" in p.stderr


def test_help_explains(env):
    p = run(env, "--help")
    assert p.returncode == 0
    for flag in ("--model", "--image", "--chat", "--json", "--max-context", "random"):
        assert flag in p.stdout


def test_ctrl_c_stops_cleanly_and_keeps_output(env):
    import signal
    import time
    p = subprocess.Popen([sys.executable, "-m", "pixtral_rt.generate", "--device", "cpu", "--max-tokens", "6000",
                          "--max-context", "8192", "--prompt", "Tell me a long story"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=ctrl_c_default)
    # wait until tokens stream, then interrupt
    first = p.stdout.read(1)
    assert first, "no output before the interrupt"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert len(first + out) > 1


# ------------------------------------------------------------------------------------------ seeds
def test_no_seed_draws_a_fresh_one_reported_in_json_and_repeatable(env):
    argv = ("--json", "--max-tokens", "12", "--temperature", "1", "--prompt", "Pick words")
    a, b = js(run(env, *argv)), js(run(env, *argv))
    assert isinstance(a["seed"], int) and isinstance(b["seed"], int)
    assert a["seed"] != b["seed"]
    # 12 tokens drawn at temperature 1 from the random model's flat distribution: equal by chance ~never
    assert a["generated_token_ids"] != b["generated_token_ids"]
    again = js(run(env, *argv, "--seed", str(a["seed"])))
    assert again["seed"] == a["seed"] and again["generated_token_ids"] == a["generated_token_ids"]
    help_text = " ".join(run(env, "--help").stdout.split())
    assert "fresh random seed" in help_text and '"seed"' in help_text


# ------------------------------------------------------------------------------------------ images
def test_directory_image_reads_as_the_loader_says_it(env, images):
    p = run(env, "--image", images["dir"], "--prompt", "x")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"image path {images['dir']!r} is a directory, not a file" in p.stderr, p.stderr


def test_animated_gif_warning_is_one_clean_line(env, images):
    p = run(env, "--json", "--max-tokens", "1", "--image", images["gif"], "--prompt", "x")
    r = js(p)
    assert r["n_images"] == 1
    lines = [line for line in p.stderr.splitlines() if "animated" in line]
    assert lines == [f"pixtral_rt: warning: image {images['gif']!r} is an animated GIF with 3 frames: using the "
                     "first frame only"], p.stderr
    assert "AnimatedImageWarning" not in p.stderr and "warnings.warn" not in p.stderr


# ------------------------------------------------------------------------------------------ --chat
def test_chat_commands_help_unknown_and_image_checks_at_once(env, images):
    missing = os.path.join(images["dir"], "missing.png")
    script = (f"/help\n/bogus words\n/image {images['dir']}\n/image {images['a']}\n//slash text\nhello\n"
              f"/image {missing}\n")   # the last one is followed by no message: it must be checked at once
    p = run(env, "--chat", "--max-tokens", "2", "--json", stdin=script)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert err.count("commands: /image PATH, /reset, /help, /quit") == 2, err   # at the start and on /help
    assert "'//text' sends '/text'" in err
    assert "pixtral_rt: error: unknown command '/bogus'" in err, err
    assert f"image path {images['dir']!r} is a directory, not a file" in err, err
    assert f"image file {missing!r} does not exist" in err, err
    assert "image attached to your next message (1 pending)" in err, err
    turns = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    # '/help', '/bogus' and the /image lines are not sent; '//slash text' is, with the one good image (which
    # the second turn has again, in its history)
    assert [t["n_images"] for t in turns] == [1, 1], turns
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]


class _Reader:
    """Collects a pipe's bytes on a thread, so the test can wait for what it expects with a deadline."""

    def __init__(self, pipe):
        self.data, self._q = b"", queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe):
        while chunk := os.read(pipe.fileno(), 65536):
            self._q.put(chunk)
        self._q.put(None)

    def wait_for(self, pattern: bytes, start: int = 0, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while (m := re.compile(pattern).search(self.data, start)) is None:
            try:
                chunk = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} within {timeout} s; got {self.data[start:]!r}") from None
            if chunk is None:
                raise AssertionError(f"stream ended before {pattern!r}; got {self.data[start:]!r}")
            self.data += chunk
        return m


def test_chat_ctrl_c_stops_the_answer_keeps_the_conversation_then_quits(env):
    """Ctrl-C during an answer: the answer stops (what was generated stays printed and in the history), the
    session goes on; Ctrl-C at the prompt ends it with exit 0. Each step waits for the output of the one
    before (no sleeps); the answers are long enough (4000 tokens) that an interrupt always lands mid-answer."""
    p = subprocess.Popen([sys.executable, "-m", "pixtral_rt.generate", "--device", "cpu", "--chat", "--max-tokens",
                          "4000", "--max-context", "8192"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, preexec_fn=ctrl_c_default)
    out, err = _Reader(p.stdout), _Reader(p.stderr)
    summary = rb"\[[^\n]*\| (\d+) prompt tokens,[^\n]* (\d+) tokens, interrupted\]"
    try:
        err.wait_for(rb"commands: ")
        p.stdin.write(b"Tell me a long story about a lighthouse keeper and the sea, please.\n")
        p.stdin.flush()
        out.wait_for(rb"\S{3}")                       # the answer streams
        p.send_signal(signal.SIGINT)
        first = err.wait_for(summary)
        note = err.wait_for(rb"answer stopped", 0)
        p1, g1 = int(first.group(1)), int(first.group(2))
        assert g1 >= 1
        shown = len(out.data)
        p.stdin.write(b"Go on.\n")
        p.stdin.flush()
        out.wait_for(rb"\S{3}", shown)               # a second answer comes
        p.send_signal(signal.SIGINT)
        second = err.wait_for(summary, note.end())
        # the second prompt holds the first question and the partial first answer
        assert int(second.group(1)) >= p1 + g1, (first.group(0), second.group(0))
        err.wait_for(rb"answer stopped", second.end())
        p.send_signal(signal.SIGINT)                 # at the prompt: quit
        assert p.wait(timeout=60) == 0, err.data.decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert b"Traceback" not in err.data


# ------------------------------------------------------------------------------------------ --device
@pytest.mark.parametrize("module", ["pixtral_rt.generate", "pixtral_rt.serve"])
@pytest.mark.parametrize("device,message", [
    ("cuda", "pixtral_rt: error: --device cuda: no CUDA GPU is visible ("),
    ("tpu", "pixtral_rt: error: --device 'tpu' is not a device this runtime runs on"),
])
def test_device_flag_checked_before_loading(env, module, device, message):
    e = dict(env, CUDA_VISIBLE_DEVICES="")   # no GPU, even on a GPU machine
    p = subprocess.run([sys.executable, "-m", module, "--device", device], input="hi", capture_output=True,
                       text=True, env=e, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.splitlines() == [p.stderr.splitlines()[0]] and p.stderr.startswith(message), p.stderr
