"""Structured output on the GPU, through the real engine loop (issue 23): what constrained decoding costs.

  step       decode step time at batch B with a fraction f of the sequences constrained by a JSON schema
             (llguidance masks filled on the host while the GPU runs the step's forward, uploaded, applied
             inside the sampling graph) against f = 0 in the same run (the baseline: every sequence free).
             B requests at once, greedy, short prompts, exactly N output tokens each (min_tokens = max_tokens
             = N; the schema's shortest answer is far longer than N); step time = 1000 / the median
             request's decode tok/s.
  compile    grammar compile time of a new schema, and of the same schema again (cached).
  tool_call  a tool_choice "required" request (one function, three typed arguments), submit to its last
             token, and its token count.

    python benchmarks/bench_constrained_step.py [--batches 1,64] [--fractions 0,0.5,1] [--tokens 48]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import record  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 400},
    "label": {"type": "string", "enum": ["a", "b", "c"]}}, "required": ["values", "label"]}
TOOL = {"name": "get_weather", "description": "weather at a place", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"]}}


def _msgs(i: int):
    return [{"role": "user", "content": f"Request {i}: list numbers and pick a label."}]


def bench_step(eng, batches, fractions, n_tokens: int) -> None:
    import numpy as np
    from pixtral_rt.sampling import SamplingParams
    from pixtral_rt.structured import Constraint
    c = Constraint.json_schema(SCHEMA)
    for B in batches:
        base = None
        for f in fractions:
            n_con = round(B * f)
            out = [None] * B

            def run(i):
                p = SamplingParams(max_tokens=n_tokens, min_tokens=n_tokens,
                                   constraint=c if i < n_con else None)
                out[i] = eng.generate(_msgs(i), p)

            for rep in range(2):                        # the first pass warms the grammar / caches
                h0, n0 = dict(eng.counters.host_s), eng.counters.steps
                ths = [threading.Thread(target=run, args=(i,)) for i in range(B)]
                [t.start() for t in ths]
                [t.join() for t in ths]
            steps = max(1, eng.counters.steps - n0)       # of the measured pass: where the step loop's host time went
            host = {k: round((v - h0[k]) * 1e3 / steps, 4) for k, v in eng.counters.host_s.items()}
            print(f"  B={B} constrained={n_con}: {steps} steps, host ms/step " +
                  " ".join(f"{k} {v:.3f}" for k, v in host.items()))
            assert all(len(r.token_ids) == n_tokens for r in out), [len(r.token_ids) for r in out]
            ms = 1e3 / float(np.median([r.timings["decode_tok_s"] for r in out]))
            if f == 0:
                base = ms
            record("constrained", f"decode step B={B} constrained={n_con}", "step_ms", ms, "ms",
                   "same batch, no sequence constrained", base, None, overhead=round(ms / base - 1, 4),
                   tokens=n_tokens, host_ms_per_step=host, steps=steps)


def bench_compile(eng) -> None:
    from pixtral_rt.structured import Constraint, check_constraint, warm_up
    warm_up(eng.tokenizer)                 # the tokenizer's grammar state: built at load on a GPU engine
    schema = dict(SCHEMA, properties=dict(SCHEMA["properties"], extra={"type": "number", "minimum": -3.5}))
    c = Constraint.json_schema(schema)
    t0 = time.perf_counter()
    check_constraint(c, eng.tokenizer)
    new = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    check_constraint(c, eng.tokenizer)
    again = (time.perf_counter() - t0) * 1e3
    record("constrained", "compile new JSON schema", "compile_ms", new, "ms", "same schema again (cached)", again,
           None)


def bench_tool_call(eng) -> None:
    from pixtral_rt.sampling import SamplingParams
    from pixtral_rt.structured import Constraint
    c = Constraint.tool_calls([TOOL], choice="required", parallel=False)
    msgs = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
    times, n = [], 0
    for _ in range(4):
        t0 = time.perf_counter()
        res = eng.generate(msgs, SamplingParams(max_tokens=96, constraint=c))
        times.append((time.perf_counter() - t0) * 1e3)
        n = len(res.token_ids)
    text = eng.tokenizer.instruct_tokenizer.tokenizer.decode(res.token_ids)
    print(f"  tool call ({res.finish_reason}, {n} tokens): {text[:160]!r}")
    record("constrained", "tool_choice required, 1 function", "round_trip_ms", sorted(times)[1], "ms", None,
           None, None, tokens=n, finish_reason=res.finish_reason, parses=_parses(text))


def _parses(text: str) -> bool:
    import json
    try:
        json.loads(text[text.index("["):])
        return True
    except ValueError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--fractions", default="0,0.5,1")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU: checks the script only")
    a = ap.parse_args()
    import torch
    if not a.cpu_smoke and not torch.cuda.is_available():
        sys.exit("bench_constrained_step: needs a CUDA GPU (--cpu-smoke runs the tiny model to check the script)")
    from pixtral_rt.serving.llm_engine import LLMEngine
    batches = [int(b) for b in a.batches.split(",")]
    eng = LLMEngine.load(None, max_batch=max(batches), max_context=4096, progress=False,
                         **({"device": "cpu"} if a.cpu_smoke else {}))
    try:
        bench_compile(eng)
        bench_step(eng, batches, [float(f) for f in a.fractions.split(",")], a.tokens)
        bench_tool_call(eng)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    main()
