"""serving/detokenize.py: the byte-level incremental text of tekken (ByteText) against mistral_common's own
decode of the whole sequence, and against the windowed decode it replaces (IncrementalText), on random token
sequences: multi-byte characters cut across tokens, special tokens in between, and raw random ids (invalid
UTF-8 runs). SentencePiece (Pixtral-Large) keeps the windowed decode."""
from __future__ import annotations

import numpy as np
import pytest

from pixtral_rt.chat import load_tokenizer
from pixtral_rt.config import PIXTRAL_12B, PIXTRAL_LARGE
from pixtral_rt.serving.detokenize import ByteText, IncrementalText, TextStream, incremental_text

TEXTS = ["naïve café — 東京タワー 🚀🚀 ok", "plain ascii words, then\n\nnew lines", "Ωμέγα ∑ x² → ∞ 👩‍👩‍👧 end",
         "  leading spaces and ‘quotes’ «»"]


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(None, PIXTRAL_12B)


def _stream(det, ids) -> list[str]:
    return [det.add(int(i)) for i in ids] + [det.flush()]


def _random_ids(raw, rng, n: int) -> list[int]:
    """Random ordinary ids (byte tokens among them: broken UTF-8), with special tokens sprinkled in."""
    ids = rng.integers(raw.num_special_tokens, raw.n_words, n).tolist()
    byte_ids = rng.integers(raw.num_special_tokens, raw.num_special_tokens + 256, n).tolist()
    out = []
    for a, b in zip(ids, byte_ids):
        r = rng.random()
        out.append(b if r < 0.4 else (int(rng.integers(0, raw.num_special_tokens)) if r < 0.5 else a))
    return out


def test_tekken_gets_the_byte_level_decoder(tekken):
    assert isinstance(incremental_text(tekken), ByteText)
    assert isinstance(TextStream(tekken)._inc, ByteText)


def test_sentencepiece_keeps_the_windowed_decode():
    pytest.importorskip("sentencepiece", reason="Pixtral-Large's v7m1 tokenizer needs sentencepiece")
    tok = load_tokenizer(None, PIXTRAL_LARGE)
    assert isinstance(incremental_text(tok), IncrementalText)


def test_byte_text_equals_full_decode_and_windowed_pieces_on_text(tekken):
    raw = tekken.instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = raw.encode(text, bos=False, eos=False)
        fast = _stream(incremental_text(tekken), ids)
        slow = _stream(IncrementalText(tekken.decode), ids)
        assert "".join(fast) == tekken.decode(ids) == text
        # at every token the text shown so far is at least what the windowed decode showed (it held a whole
        # window back at a cut character; the byte decoder holds only the cut bytes)
        for k in range(1, len(ids) + 1):
            shown, shown_slow = "".join(fast[:k]), "".join(slow[:k])
            assert shown.startswith(shown_slow) and text.startswith(shown)


@pytest.mark.parametrize("seed", range(6))
def test_byte_text_equals_full_decode_on_random_ids(tekken, seed):
    """Random ids: invalid UTF-8 (lone continuation bytes, cut sequences), special tokens cutting a character;
    the concatenated pieces equal tekken's decode of the whole, and no piece holds half a character."""
    raw = tekken.instruct_tokenizer.tokenizer
    rng = np.random.default_rng(seed)
    ids = _random_ids(raw, rng, 400)
    fast = _stream(incremental_text(tekken), ids)
    assert "".join(fast) == tekken.decode(ids)
    assert "".join(_stream(IncrementalText(tekken.decode), ids)) == tekken.decode(ids)
    for k in (1, 37, 200):                     # any prefix, flushed: the decode of that prefix
        det = incremental_text(tekken)
        assert "".join(_stream(det, ids[:k])) == tekken.decode(ids[:k])
    assert "\ufffd" in "".join(fast)           # the case under test: broken sequences were there


def test_text_stream_stop_strings_with_byte_text(tekken):
    raw = tekken.instruct_tokenizer.tokenizer
    text = "first part 東京 STOP never shown"
    ids = raw.encode(text, bos=False, eos=False)
    ts = TextStream(tekken, stop=("STOP",))
    pieces = [ts.add([i]) for i in ids]
    pieces.append(ts.finish())
    assert ts.stopped and "".join(pieces) == "first part 東京 " and ts.text == "first part 東京 "
