"""Structured output and tool calls: grammars that constrain what a sequence may sample.

    from pixtral_rt.structured import Constraint, check_constraint, make_matcher, fill_bitmasks
    c = Constraint.json_schema({"type": "object", ...})      # or json_object(), tool_calls(tools, choice)
    check_constraint(c, tokenizer)            # server: compile (cached); ConstraintError -> HTTP 400
    m = make_matcher(c, tokenizer, vocab_size)
    m.fill_bitmask(row); m.accept(tok); m.is_stopped()

Files, one job each: constraint.py (what a request asks for, text only: it crosses the engine's process
boundary inside SamplingParams), vocab.py (a mistral_common tokenizer as token bytes + format facts),
grammar.py (Constraint -> Lark grammar in the tokenizer version's own tool-call format), matcher.py
(compile caches, per-sequence matchers, batched mask fills), tool_calls.py (the model's [TOOL_CALLS] output
-> OpenAI tool calls, streamed or whole).

Why llguidance, not xgrammar (benchmarks/bench_structured.py; the numbers and the runs in
benchmarks/results/logs/structured_cpu/README.md; development CPU, 2 shared cores):
- Mistral's tool-call format needs the [TOOL_CALLS] control token inside the grammar. llguidance's Lark
  names a token by id (<[9]>), as mistral_common's own guidance integration does; in xgrammar, with the
  control tokens marked special (empty text, as it requires), the same grammar compiled but its first mask
  allowed no token at all: a tool call could never start.
- A schema it cannot enforce is refused with the reason ("Unimplemented keys: [\"uniqueItems\"]", "Unknown
  format"), which becomes the 400 naming the part; xgrammar compiled uniqueItems, not and an unknown format
  and would not have enforced them.
- Compile per new schema: 1.7-4.3 ms against 6-49 ms (each new schema compiles at request time in the server
  and again in the engine process).
- Per-token masks cost the same order: median 8-44 us (xgrammar 10-29 us). xgrammar is faster on deep schemas
  and, with its per-state mask cache, when many sequences share one state (64 matchers: 0.05-0.3 ms against
  0.1-2.0 ms); llguidance's worst single masks reach 0.6-2 ms on deep schemas. It is host work done while the
  GPU runs the previous step (a Pixtral-12B decode step is 6-10 ms), so correctness and compile times weigh
  more. Tokenizer init, once per process: 0.55 s for tekken (xgrammar 0.1 s), done by warm_up() at start-up.
"""
from .constraint import Constraint
from .matcher import Matcher, check_constraint, compile_seconds, fill_bitmasks, make_matcher, warm_up

__all__ = ["Constraint", "Matcher", "check_constraint", "compile_seconds", "fill_bitmasks", "make_matcher",
           "warm_up"]
