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

Why llguidance, not xgrammar (benchmarks/bench_structured.py; numbers and the run in
benchmarks/results/logs/structured_cpu/README.md; development CPU, 2 shared cores):
- Mistral's tool-call format needs the [TOOL_CALLS] special token inside the grammar. llguidance's Lark
  names a token by id (<[9]>), as mistral_common's own guidance integration does; in xgrammar, with the
  special tokens marked special (empty text, as it requires), the same grammar compiled but its first mask
  allowed no token at all: a tool call could never start.
- A schema it cannot enforce is refused, with the reason (uniqueItems, not, an unknown format: "Unimplemented
  keys: [\"uniqueItems\"]"), which becomes the 400 naming the part; xgrammar compiled those three and would
  silently not enforce them.
- Compile time per new schema 1.6-6 ms against 8-75 ms (each new schema compiles at request time in the
  server and again in the engine process), and tokenizer init 0.6 s against 2.6 s on tekken's 131072 ids.
- Per-token masks cost the same order: median 11-75 us (xgrammar 12-50 us), p90 <= 160 us; xgrammar is
  faster on deep schemas and, thanks to its per-state mask cache, when many sequences sit in the same state
  (batch of 64 at one state: 0.1-0.2 ms against llguidance's 0.2-3.5 ms on 2 cores). All of it runs on the
  host while the GPU runs the previous step (a 12B decode step is 6-10 ms), so llguidance's correctness and
  compile times weigh more than that.
"""
from .constraint import Constraint
from .matcher import Matcher, check_constraint, compile_seconds, fill_bitmasks, make_matcher, warm_up

__all__ = ["Constraint", "Matcher", "check_constraint", "compile_seconds", "fill_bitmasks", "make_matcher",
           "warm_up"]
