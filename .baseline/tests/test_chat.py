"""encode_request vs mistral_common's encode_chat_completion: identical token ids and pixel tensors
(max abs error <= 1e-4) on 24+ requests (0-5 images of awkward sizes, multi-turn, system prompts) for v3
tekken (Pixtral-12B), v7 SentencePiece (Pixtral-Large) and v7 tekken with the patch merger (Mistral-Small-3.1
shaped); limits and bad requests refused up front with specific errors."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pixtral_rt.chat import EncodedRequest, encode_request, load_tokenizer
from pixtral_rt.config import MISTRAL_SMALL_31, PIXTRAL_12B, PIXTRAL_LARGE, tiny
from pixtral_rt.errors import (ContextLengthError, ImageDecodeError, ImageSourceError, MessageFormatError,
                               TokenizerError, TooManyImagesError)

SIZES = [(1, 1), (15, 17), (16, 16), (17, 1500), (1024, 1024), (1025, 1023), (2000, 1000), (5000, 200)]
_IMAGES = {s: Image.fromarray(np.random.default_rng(i).integers(0, 256, (s[1], s[0], 3), dtype=np.uint8))
           for i, s in enumerate(SIZES)}


def _has_sentencepiece():
    try:
        import sentencepiece  # noqa: F401
        return True
    except ImportError:
        return False


def _small31_folder(tmp):
    """A Mistral-Small-3.1-shaped tokenizer folder: the packaged tekken vocab as a v7 file with the patch-merger
    image config (the real file is not packaged in mistral_common; ids 10/12/13 are the same)."""
    import mistral_common
    d = json.load(open(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")))
    d["config"]["version"] = "v7"
    d["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tekken.json").write_text(json.dumps(d))
    return tmp


@pytest.fixture(scope="module", params=["v3-12b", "v7-large", "v7-small31"])
def model(request, tmp_path_factory):
    if request.param == "v3-12b":
        return PIXTRAL_12B, load_tokenizer(None, PIXTRAL_12B)
    if request.param == "v7-large":
        if not _has_sentencepiece():
            pytest.skip("sentencepiece not installed: Pixtral-Large's v7m1 tokenizer needs it "
                        "(pip install 'mistral_common[sentencepiece]')")
        return PIXTRAL_LARGE, load_tokenizer(None, PIXTRAL_LARGE)
    return MISTRAL_SMALL_31, load_tokenizer(_small31_folder(tmp_path_factory.mktemp("small31")), MISTRAL_SMALL_31)


def _img(size):
    return {"type": "image", "image": _IMAGES[size]}


def _txt(t):
    return {"type": "text", "text": t}


REQUESTS = {
    "text-only": [{"role": "user", "content": "Hello there"}],
    "system-text": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "1x1": [{"role": "user", "content": [_img((1, 1)), _txt("What is this?")]}],
    "15x17-text-first": [{"role": "user", "content": [_txt("Describe"), _img((15, 17))]}],
    "16x16-only": [{"role": "user", "content": [_img((16, 16))]}],
    "17x1500": [{"role": "user", "content": [_txt("tall:"), _img((17, 1500)), _txt("ok?")]}],
    "1024": [{"role": "user", "content": [_img((1024, 1024)), _txt("square")]}],
    "1025x1023": [{"role": "user", "content": [_img((1025, 1023)), _txt("almost square")]}],
    "2000x1000": [{"role": "user", "content": [_txt("wide"), _img((2000, 1000)), _txt("end")]}],
    "5000x200": [{"role": "user", "content": [_img((5000, 200)), _txt("banner")]}],
    "two-images": [{"role": "user", "content": [_img((15, 17)), _txt("and"), _img((16, 16))]}],
    "three-images-system": [{"role": "system", "content": "You see images."},
                            {"role": "user", "content": [_img((1, 1)), _img((17, 1500)), _txt("x"), _img((15, 17))]}],
    "five-images": [{"role": "user", "content": [_img(s) for s in SIZES[:5]] + [_txt("compare")]}],
    "multi-turn": [{"role": "user", "content": [_img((15, 17)), _txt("first?")]},
                   {"role": "assistant", "content": "A square."},
                   {"role": "user", "content": [_txt("and now"), _img((2000, 1000))]}],
    "multi-turn-system": [{"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "Bonjour"},
                          {"role": "assistant", "content": "Salut"},
                          {"role": "user", "content": [_img((16, 16)), _txt("Quoi?")]}],
    "multi-turn-images-each-turn": [{"role": "user", "content": [_img((1, 1))]},
                                    {"role": "assistant", "content": "dot"},
                                    {"role": "user", "content": [_img((17, 1500)), _txt("line?")]},
                                    {"role": "assistant", "content": "line"},
                                    {"role": "user", "content": [_txt("last"), _img((5000, 200))]}],
    "literal-img-text": [{"role": "user", "content": [_txt("type [IMG] and [IMG_BREAK][IMG_END] here"),
                                                      _img((16, 16))]}],
    "literal-img-no-image": [{"role": "user", "content": "[IMG][IMG][IMG]"}],
    "string-parts": [{"role": "user", "content": ["plain string part ", _img((15, 17))]}],
    "image-url-data": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, _txt("x")]}],  # filled below
    "unicode": [{"role": "system", "content": "Réponds 日本語で"},
                {"role": "user", "content": [_txt("¿Qué es esto? 🙂"), _img((1025, 1023))]}],
    "empty-text-part": [{"role": "user", "content": [_txt(""), _img((15, 17)), _txt("")]}],
    "four-images-two-turns": [{"role": "user", "content": [_img((1, 1)), _img((16, 16))]},
                              {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": [_img((15, 17)), _img((17, 1500)), _txt("now")]}],
    "assistant-prefix-free-last-user": [{"role": "system", "content": "S"},
                                        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}],
}
_buf = io.BytesIO()
_IMAGES[(15, 17)].save(_buf, "PNG")
import base64  # noqa: E402

REQUESTS["image-url-data"][0]["content"][0]["image_url"]["url"] += base64.b64encode(_buf.getvalue()).decode()


def _to_mistral(messages):
    """The same request written with mistral_common's own classes (the oracle's input)."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    out = []
    for m in messages:
        c = m["content"]
        if m["role"] == "system":
            out.append(SystemMessage(content=c))
        elif m["role"] == "assistant":
            out.append(AssistantMessage(content=c))
        elif isinstance(c, str):
            out.append(UserMessage(content=c))
        else:
            chunks = []
            for p in c:
                if isinstance(p, str):
                    chunks.append(TextChunk(text=p))
                elif p["type"] == "text":
                    if p["text"]:
                        chunks.append(TextChunk(text=p["text"]))
                elif p["type"] == "image":
                    chunks.append(ImageChunk(image=p["image"]))
                else:
                    url = p["image_url"]["url"]
                    chunks.append(ImageChunk(image=Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))))
            if all(isinstance(ch, TextChunk) for ch in chunks):
                chunks = [TextChunk(text="".join(ch.text for ch in chunks))]
            out.append(UserMessage(content=chunks))
    return out


@pytest.mark.parametrize("name", list(REQUESTS))
def test_tokens_and_pixels_match_mistral_common(model, name):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    args, tok = model
    messages = REQUESTS[name]
    ref = tok.encode_chat_completion(ChatCompletionRequest(messages=_to_mistral(messages)))
    got = encode_request(messages, tok, args)
    assert isinstance(got, EncodedRequest)
    assert got.tokens == ref.tokens
    assert got.prompt_tokens == len(ref.tokens)
    assert len(got.images) == len(ref.images)
    for a, b in zip(got.images, ref.images):
        assert a.dtype.is_floating_point and tuple(a.shape) == b.shape
        assert float((a - __import__("torch").from_numpy(b)).abs().max()) <= 1e-4
    v = args.vision
    assert got.image_token_positions == [i for i, t in enumerate(ref.tokens) if t == v.image_token_id]
    m = v.spatial_merge_size
    assert got.cu_seqlens == list(np.cumsum([0] + [r * c for r, c in got.patch_grids]))
    for (r, c), img in zip(got.patch_grids, got.images):
        assert (img.shape[1], img.shape[2]) == (r * v.patch_size, c * v.patch_size) and r % m == 0 and c % m == 0
    assert sum((r // m) * (c // m) for r, c in got.patch_grids) == len(got.image_token_positions)


def test_image_order_follows_the_prompt():
    tok = load_tokenizer(None, PIXTRAL_12B)
    msgs = [{"role": "user", "content": [_txt("a"), _img((2000, 1000))]},    # mistral_common moves it first
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [_img((15, 17)), _txt("b"), _img((16, 16))]}]
    r = encode_request(msgs, tok, PIXTRAL_12B)
    assert r.image_sizes == [(2000, 1000), (15, 17), (16, 16)]
    assert r.patch_grids == [(32, 64), (2, 1), (1, 1)]
    assert r.cu_seqlens == [0, 2048, 2050, 2051]
    assert r.image_names == ["messages[0].content[1]", "messages[2].content[0]", "messages[2].content[2]"]


def test_exif_rotated_image_gets_rotated_grid():
    exif = Image.Exif()
    exif[0x0112] = 6
    b = io.BytesIO()
    Image.fromarray(np.zeros((32, 100, 3), np.uint8)).save(b, "PNG", exif=exif)
    r = encode_request([{"role": "user", "content": [{"type": "image", "image": b.getvalue()}]}],
                       load_tokenizer(None, PIXTRAL_12B), PIXTRAL_12B)
    assert r.patch_grids == [(7, 2)] and tuple(r.images[0].shape) == (3, 112, 32)


# ------------------------------------------------------------------------------------------ limits
@pytest.fixture(scope="module")
def tok12():
    return load_tokenizer(None, PIXTRAL_12B)


def test_too_many_images_refused_before_any_image_is_opened(tok12):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"/nope/{i}.png"}}
                                         for i in range(13)]}]
    with pytest.raises(TooManyImagesError, match="13 images; at most 12"):
        encode_request(msgs, tok12, PIXTRAL_12B)
    with pytest.raises(TooManyImagesError, match="3 images; at most 2"):
        encode_request([{"role": "user", "content": [_img((1, 1))] * 3}], tok12, PIXTRAL_12B, max_images=2)


def test_context_refused_with_counts_before_decoding(tok12):
    b = io.BytesIO()
    Image.fromarray(np.zeros((1000, 2000, 3), np.uint8)).save(b, "PNG")
    truncated = b.getvalue()[:200]  # header fine, pixels missing: decoding would fail
    msgs = [{"role": "user", "content": [{"type": "image", "image": truncated}, _txt("hi")]}]
    with pytest.raises(ContextLengthError, match=r"\d+ prompt tokens \(\d+ text \+ 2080 for 1 image\(s\)\) "
                                                 r"\+ 100 max_tokens = \d+, over the context of 2000"):
        encode_request(msgs, tok12, PIXTRAL_12B, max_context=2000, max_tokens=100)
    with pytest.raises(ImageDecodeError, match=r"messages\[0\].content\[0\]: image <200 bytes>"):
        encode_request(msgs, tok12, PIXTRAL_12B)
    small = tiny()  # max_seq_len 8192 from the config when max_context is None
    with pytest.raises(ContextLengthError, match="context of 8192"):
        encode_request([{"role": "user", "content": "hi"}], tok12, small, max_tokens=9000)


def test_exact_fit_is_accepted(tok12):
    msgs = [{"role": "user", "content": [_img((16, 16)), _txt("x")]}]
    n = encode_request(msgs, tok12, PIXTRAL_12B).prompt_tokens
    assert encode_request(msgs, tok12, PIXTRAL_12B, max_context=n + 5, max_tokens=5).prompt_tokens == n
    with pytest.raises(ContextLengthError):
        encode_request(msgs, tok12, PIXTRAL_12B, max_context=n + 4, max_tokens=5)


@pytest.mark.parametrize("messages,pattern", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "x"}], r"messages\[0\] must be a dict with a 'role'"),
    ([{"role": "robot", "content": "x"}], r"role 'robot' is not one of"),
    ([{"role": "user", "content": 5}], r"content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], r"unknown part type 'video'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"needs \{'image_url': \{'url'"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"text part needs a string"),
    ([{"role": "user"}], r"has no content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [_img((1, 1))]}],
     r"messages\[1\].content\[0\]: images are only accepted in user messages"),
    ([{"role": "assistant", "content": "first"}], "rejected by the chat format"),
])
def test_bad_messages(tok12, messages, pattern):
    with pytest.raises(MessageFormatError, match=pattern):
        encode_request(messages, tok12, PIXTRAL_12B)


def test_bad_image_named_by_position(tok12):
    msgs = [{"role": "user", "content": [_txt("x"), {"type": "image_url", "image_url": "ftp://h/cat.png"}]}]
    with pytest.raises(ImageSourceError, match=r"messages\[0\].content\[1\]: image URL 'ftp://h/cat.png'"):
        encode_request(msgs, tok12, PIXTRAL_12B)


# ------------------------------------------------------------------------------------------ tokenizer
def test_load_tokenizer_sources_and_mismatch(tmp_path):
    with pytest.raises(TokenizerError, match="not packaged"):
        load_tokenizer(None, MISTRAL_SMALL_31)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing", PIXTRAL_12B)
    folder = _small31_folder(tmp_path / "s31")
    with pytest.raises(TokenizerError, match=r"patch_size: model 16 vs tokenizer 14"):
        load_tokenizer(folder, PIXTRAL_12B)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tekken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path / "bad", PIXTRAL_12B)
    tok = load_tokenizer(tmp_path / "s31" / "..", PIXTRAL_12B)  # no tokenizer file at top level: packaged one
    assert tok.instruct_tokenizer.image_encoder.image_config.image_patch_size == 16  # packaged fallback


_BOUND_CASES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief. " * 40}, {"role": "user", "content": "Résumé: naïve café 😀🚀 " * 30},
     {"role": "assistant", "content": "D'accord — 好的 " * 20}, {"role": "user", "content": "[IMG] typed, <s> too"}],
    [{"role": "user", "content": [_txt("one"), _txt("two " * 200), _txt("\n\n\t  spaces   ")]}],
    [{"role": "user", "content": "x" * 3000}],
]


@pytest.mark.parametrize("case", range(len(_BOUND_CASES)))
def test_text_token_bound_is_an_upper_bound(model, case):
    """chat._text_token_bound (used to start decoding images before the exact context check) never
    undercounts the prompt's text tokens, for every tokenizer."""
    from pixtral_rt.chat import _parse_messages, _text_token_bound
    args, tok = model
    msgs = _BOUND_CASES[case]
    n = encode_request(msgs, tok, args).prompt_tokens
    bound = _text_token_bound(_parse_messages(msgs)[0])
    assert n <= bound, (n, bound)
