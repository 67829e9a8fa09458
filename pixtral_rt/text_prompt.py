"""Raw text prompts (no chat format, no images) -> what the engine runs: the EncodedRequest of a text
completion (POST /v1/completions), and the token-id checks that /v1/completions and /detokenize share.

    req = encode_text_prompt("Once upon a time", tokenizer, args, max_context=8192, max_tokens=16)
    req = encode_text_prompt([1, 22177, 1766], tokenizer, args, max_context=8192, max_tokens=16)

A string is tokenised with the model's own tokenizer (mistral_common's raw tokenizer: tekken or
SentencePiece), BOS first unless add_special_tokens=False, never EOS; control-token names typed in the
text ("[INST]") are encoded as text, as the chat encoder does. A list of ids is taken as it is, after
checking every id against the vocabulary; [IMG] is refused there, because it stands for image features a
text prompt has none of. The context check and its error (ContextLengthError with the counts) are those of
the chat encoder (pixtral_rt/chat.py), so the server answers both the same way.
"""
from __future__ import annotations

from .chat import EncodedRequest
from .config import PixtralArgs
from .errors import ContextLengthError, RequestError


def vocab_size(tokenizer, args: PixtralArgs) -> int:
    """Ids a prompt may hold: those both the tokenizer can decode and the model can embed."""
    return min(tokenizer.instruct_tokenizer.tokenizer.n_words, args.text.vocab_size)


def check_token_ids(ids, vocab: int, where: str, image_token_id: int | None = None) -> list[int]:
    """`ids` as a list of ints, each in 0..vocab-1 (and not [IMG] when image_token_id is given); RequestError
    naming the first bad one as `where[i]` otherwise. A JSON true / false is not a token id."""
    if not isinstance(ids, (list, tuple)):
        raise RequestError(f"{where}: expected a list of token ids, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise RequestError(f"{where}[{i}]: a token id must be an integer, got {t!r:.40}")
        if not 0 <= t < vocab:
            raise RequestError(f"{where}[{i}]: token id {t} is outside the vocabulary (0..{vocab - 1})")
        if t == image_token_id:
            raise RequestError(f"{where}[{i}]: token id {t} is the [IMG] control token, which stands for image "
                               "features; a text prompt has no image (send images through /v1/chat/completions)")
    return list(ids)


def text_prompt_tokens(prompt: str | list[int], tokenizer, args: PixtralArgs, *, add_special_tokens: bool = True,
                       where: str = "prompt") -> list[int]:
    """The token ids of a raw prompt: a string tokenised (BOS first when add_special_tokens), or a checked list
    of ids (taken as given: add_special_tokens does not add a BOS to ids, as in vLLM)."""
    if isinstance(prompt, str):
        return list(tokenizer.instruct_tokenizer.tokenizer.encode(prompt, bos=add_special_tokens, eos=False))
    return check_token_ids(prompt, vocab_size(tokenizer, args), where, args.vision.image_token_id)


def encode_text_prompt(prompt: str | list[int], tokenizer, args: PixtralArgs, *, max_context: int, max_tokens: int,
                       add_special_tokens: bool = True, where: str = "prompt") -> EncodedRequest:
    """Tokenise / check a raw prompt and check it against the context: prompt + max_tokens must fit
    (ContextLengthError with the counts, as for a chat request). An empty prompt (no token at all) is a
    RequestError: the model needs at least one token to predict the next."""
    tokens = text_prompt_tokens(prompt, tokenizer, args, add_special_tokens=add_special_tokens, where=where)
    if not tokens:
        raise RequestError(f"{where}: the prompt has no tokens (an empty string without add_special_tokens, or "
                           "an empty list): give at least one")
    if len(tokens) + max_tokens > max_context:
        raise ContextLengthError(
            f"{where}: request needs {len(tokens)} prompt tokens + {max_tokens} max_tokens = "
            f"{len(tokens) + max_tokens}, over the context of {max_context} tokens: shorten the prompt or lower "
            "max_tokens")
    return EncodedRequest(tokens=tokens, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                          prompt_tokens=len(tokens), max_tokens=max_tokens)
