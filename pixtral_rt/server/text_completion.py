"""One text completion (POST /v1/completions) in the engine: the choices of one or more prompts, and their
logprobs in OpenAI's legacy shape. Built on completion.CompletionRun (the same token events -> text deltas,
stop strings, cancellation and abort as chat); what differs is that each choice may have its own prompt,
and the usage counts every prompt once.
"""
from __future__ import annotations

from ..chat import EncodedRequest
from .completion import CompletionRun
from .completions_protocol import CompletionLogprobs
from .protocol import PromptTokensDetails, TokenLogprob, Usage


class TextCompletionRun(CompletionRun):
    """Choices k * n .. k * n + n - 1 belong to prompt k (OpenAI's numbering). Create on the event loop;
    submit_prompts(); iterate deltas(); close() always."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prompt_of: list[int] = []          # choice -> prompt index
        self._prompt_lens: list[int] = []        # prompt index -> its tokens
        self._cached: list[int] = [0] * len(self.choices)   # choice -> prompt tokens from the prefix cache

    def submit_prompts(self, reqs: list[EncodedRequest], params: list[list]) -> None:
        """params[k]: the SamplingParams of prompt k's choices. If the engine refuses one (queue full, too
        long), those already submitted are cancelled and the error propagates."""
        self._prompt_lens = [r.prompt_tokens for r in reqs]
        self.prompt_tokens = sum(self._prompt_lens)
        try:
            i = 0
            for k, (req, ps) in enumerate(zip(reqs, params)):
                for p in ps:
                    self._prompt_of.append(k)
                    self.choices[i].handle = self.engine.submit(req, p, self._callback(i), logprobs=self.logprobs)
                    i += 1
        except BaseException:
            self.close()
            raise

    def _callback(self, index: int):
        cb = super()._callback(index)

        def note_cached(event) -> None:   # one int store before the event is enqueued
            self._cached[index] = max(self._cached[index], event.cached_tokens)
        cb.before = note_cached
        return cb

    def usage(self) -> Usage:
        """Every prompt counted once (however many choices it has), as OpenAI counts a batch; cached tokens:
        per prompt, the most any of its choices was served from the prefix cache."""
        cached = [0] * len(self._prompt_lens)
        for i, k in enumerate(self._prompt_of):
            cached[k] = max(cached[k], self._cached[i])
        completion = sum(c.n_tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached)))


class LegacyLogprobs:
    """A choice's logprobs in the legacy completions shape, built as its tokens arrive (streamed chunks each
    carry their own tokens' part; offsets go on across chunks). text_offset of a token: the character offset
    of its text in the choice's text, counting each earlier token's text (as vLLM does) after `start`
    characters of echoed prompt."""

    def __init__(self, start: int = 0):
        self.offset = start

    def part(self, items: list[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for it in items:
            top = {t.token: t.logprob for t in it.top_logprobs}
            top.setdefault(it.token, it.logprob)     # the chosen token is always listed (up to logprobs + 1)
            out.tokens.append(it.token)
            out.token_logprobs.append(it.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(it.token)
        return out
