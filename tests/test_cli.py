"""`python -m pixtral_rt.generate` end to end on CPU with the embedded tiny random model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


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
    return {"a": str(a), "b": str(b), "bad": str(bad)}


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
                "text", "timings"):
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
    script = f"/image {images['bad']}\nlook\nstill there?\n"
    p = run(env, "--chat", "--max-tokens", "2", "--json", stdin=script)
    assert p.returncode == 0, p.stderr
    assert "not a recognised image" in p.stderr or "corrupt" in p.stderr.lower()
    assert len([line for line in p.stdout.splitlines() if line.strip()]) == 1


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
                         stderr=subprocess.PIPE, text=True, env=env)
    # wait until tokens stream, then interrupt
    first = p.stdout.read(1)
    assert first, "no output before the interrupt"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert len(first + out) > 1


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
