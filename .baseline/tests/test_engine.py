"""Engine on CPU with the reference backend: streaming equals the final text, stop strings, raw-pixel
requests (the fast backend's path) carry everything the GPU preprocessing needs."""
import numpy as np
import pytest
import torch

from pixtral_rt.chat import encode_request, load_tokenizer
from pixtral_rt.config import tiny
from pixtral_rt.engine import Engine, ReferenceBackend, decoder_weight_bytes
from pixtral_rt.preprocess import chw_to_patches, preprocess
from pixtral_rt.random_weights import random_state_dict
from pixtral_rt.reference.model import PixtralModel
from pixtral_rt.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    args = tiny()
    model = PixtralModel(args)
    model.load_state_dict(random_state_dict(args, seed=4, dtype=torch.float32))
    be = ReferenceBackend(model.eval(), args, torch.device("cpu"), torch.float32, 4096)
    return Engine(args, load_tokenizer(None, args), be, {"backend": "reference"}, 4096)


def msgs(n_images=1):
    rng = np.random.default_rng(n_images)
    imgs = [{"type": "image", "image": rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)} for _ in range(n_images)]
    return [{"role": "user", "content": imgs + [{"type": "text", "text": "What is shown?"}]}]


def test_stream_pieces_join_to_text(engine):
    pieces = list(engine.stream(msgs(2), SamplingParams(max_tokens=12)))
    res = engine.last
    assert "".join(pieces) == res.text and len(res.token_ids) == 12 and res.finish_reason == "length"
    assert res.text == engine.tokenizer.decode(res.token_ids)


def test_stop_string_cuts_text(engine):
    full = engine.generate(msgs(1), SamplingParams(max_tokens=12))
    assert len(full.text) > 4
    stop = full.text[3:6]
    res = engine.generate(msgs(1), SamplingParams(max_tokens=12, stop=(stop,)))
    assert res.finish_reason == "stop" and res.text == full.text[:full.text.find(stop)]


def test_raw_pixel_request_matches_host_preprocessing(engine):
    a = engine.args
    host = encode_request(msgs(2), engine.tokenizer, a, raw_pixels=False)
    raw = encode_request(msgs(2), engine.tokenizer, a, raw_pixels=True)
    assert raw.images_are_raw and not host.images_are_raw
    assert raw.tokens == host.tokens and raw.cu_seqlens == host.cu_seqlens
    for px, hw, chw in zip(raw.images, raw.image_out_hw, host.images):
        assert px.dtype == np.uint8 and px.shape[2] == 3 and tuple(chw.shape[1:]) == hw
        out = torch.from_numpy(preprocess(px, hw))
        assert torch.equal(out, chw)
        assert chw_to_patches(out, a.vision.patch_size).shape[0] == (hw[0] // 16) * (hw[1] // 16)


def test_weight_bytes_formula():
    from pixtral_rt.config import PIXTRAL_12B
    # performance.md: 11.57 B params read per token (all but the embedding table) = 23.1 GB
    assert abs(decoder_weight_bytes(PIXTRAL_12B) / 2 / 1e9 - 11.57) < 0.01


def test_incremental_text_matches_full_decode_on_multibyte_text(engine):
    """Window decoding yields exactly the full decode, for text with multi-byte characters split across
    byte-level tokens, and holds back the start of a stop string."""
    from pixtral_rt.serving.detokenize import IncrementalText as _IncrementalText, stop_prefix_len as _stop_prefix_len
    tok = engine.tokenizer
    text = "naïve café — 東京タワー 🚀🚀 ok"
    ids = tok.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    det = _IncrementalText(tok.decode)
    out = "".join(det.add(i) for i in ids) + det.flush()
    assert out == tok.decode(ids) == text
    assert _stop_prefix_len("hello wor", ("world",)) == 3 and _stop_prefix_len("hello", ("xyz",)) == 0


def test_stop_string_spanning_tokens_is_never_streamed(engine):
    full = engine.generate(msgs(1), SamplingParams(max_tokens=12))
    stop = full.text[2:9]
    pieces = list(engine.stream(msgs(1), SamplingParams(max_tokens=12, stop=(stop,))))
    res = engine.last
    assert "".join(pieces) == res.text == full.text[:full.text.find(stop)]
