"""Grammar libraries for constrained decoding, on this runtime's tokenizers (CPU work, no model):
llguidance (what pixtral_rt.structured uses) against xgrammar.

    python -m benchmarks.bench_structured              # tekken v3 (Pixtral-12B) and SentencePiece v7m1
    python -m benchmarks.bench_structured --steps 48 --batch 64

For each library and tokenizer: tokenizer-init time (vocabulary -> library state, once per process),
compile time of each schema (first time, no cache), the per-token mask time along a seeded random walk
through the grammar (each step: fill the mask, pick a uniformly random allowed token, accept it; the mask
fill alone is timed), and one batched fill of `--batch` matchers (llguidance LLExecutor, xgrammar
BatchGrammarMatcher, both on every core). Tokenizers: mistral_common's packaged tekken_240911.json
(131072 ids) and its packaged SentencePiece v7m1 model (Pixtral-Large, 32768 ids).

Both libraries get the same JSON layout (separators ", " / ": ", no free whitespace). The tool-call case is
each library's Lark with the [TOOL_CALLS] special token by id and %json arguments (for xgrammar the
arguments' %json uses its own defaults, which allow whitespace). The baseline of each row is the other
library's figure in the same run. Rows go to benchmarks/results/structured_cpu.jsonl. xgrammar is not a
dependency of the runtime: without it installed only llguidance is measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.common import record
from pixtral_rt.structured.constraint import Constraint
from pixtral_rt.structured.grammar import lark_for
from pixtral_rt.structured.vocab import vocab_of

NESTED = {
    "type": "object", "additionalProperties": False, "required": ["id", "kind", "tags", "pos"],
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["point", "line", "area"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "pos": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                "properties": {"x": {"type": "number", "minimum": -90, "maximum": 90},
                               "y": {"type": "number", "minimum": -180, "maximum": 180}}},
        "note": {"type": "string", "maxLength": 10}}}
WIDE = {"type": "object", "additionalProperties": False, "required": [f"k{i}" for i in range(0, 20, 2)],
        "properties": {f"k{i}": ({"type": "integer"} if i % 3 == 0 else {"type": "boolean"} if i % 3 == 1
                                 else {"type": "string", "maxLength": 4}) for i in range(20)}}
TOOLS = [{"name": "get_weather", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["city"],
             "properties": {"city": {"type": "string", "maxLength": 12},
                            "unit": {"enum": ["celsius", "fahrenheit"]}}}},
         {"name": "search", "parameters": NESTED},
         {"name": "wide", "parameters": WIDE},
         {"name": "ping", "parameters": None}]

CASES = {
    "json_object": Constraint.json_object(),
    "json_schema nested": Constraint.json_schema(NESTED),
    "json_schema 20 keys": Constraint.json_schema(WIDE),
    "tool_calls required (4 tools)": Constraint.tool_calls(TOOLS, "required"),
    "tool_calls auto (free text)": Constraint.tool_calls(TOOLS, "auto"),
}


def load_tokenizers() -> dict:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return {"tekken v3 (Pixtral-12B)": MistralTokenizer.v3(is_tekken=True, is_mm=True),
            "SentencePiece v7m1 (Pixtral-Large)": MistralTokenizer.v7(is_mm=True)}


# --------------------------------------------------------------------------------------------- libraries
class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer):
        import llguidance as llg
        from pixtral_rt.structured.matcher import _LLWrapper
        self.llg, self.v = llg, vocab_of(tokenizer)
        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(_LLWrapper(self.v)))
        self.executor = llg.LLExecutor()

    def compile(self, c: Constraint):
        m = self.llg.LLMatcher(self.tok, self.llg.LLMatcher.grammar_from_lark(lark_for(c, self.v)), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, row: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.size * 4)

    def accept(self, m, tok: int) -> bool:
        return m.consume_token(tok)

    def done(self, m) -> bool:
        return m.is_stopped()

    def fill_batch(self, ms, out: np.ndarray) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], out.ctypes.data,
                                              out.shape[1] * 4, out.shape[0])


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer):
        import xgrammar as xgr
        self.xgr, self.v = xgr, vocab_of(tokenizer)
        # special tokens as empty strings: xgrammar takes those for special (never matched as text)
        special = set(self.v.special_ids)
        raw = tokenizer.instruct_tokenizer.tokenizer
        if self.v.sentencepiece:
            vocab = ["" if i in special else raw.id_to_piece(i) for i in range(self.v.n_words)]
            vt, prefix = xgr.VocabType.BYTE_FALLBACK, True
        else:
            vocab = [b"" if i in special else t for i, t in enumerate(self.v.tokens)]
            vt, prefix = xgr.VocabType.RAW, False
        info = xgr.TokenizerInfo(vocab, vt, vocab_size=self.v.n_words, stop_token_ids=[self.v.eos_id],
                                 add_prefix_space=prefix)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, c: Constraint):
        if c.kind == "json_object":
            return self.compiler.compile_json_schema({"type": "object"}, any_whitespace=False,
                                                     separators=(", ", ": "))
        if c.kind == "json_schema":
            return self.compiler.compile_json_schema(c.schema, any_whitespace=False, separators=(", ", ": "))
        return self.compiler.compile_lark(_strip_x_guidance(lark_for(c, self.v)))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, row: np.ndarray) -> None:
        import torch
        m.fill_next_token_bitmask(torch.from_numpy(row[None]))

    def accept(self, m, tok: int) -> bool:
        return m.accept_token(tok)

    def done(self, m) -> bool:
        return m.is_terminated()

    def fill_batch(self, ms, out: np.ndarray) -> None:
        import torch
        self.batch.batch_fill_next_token_bitmask(ms, torch.from_numpy(out))


def _strip_x_guidance(lark: str) -> str:
    """The llguidance-only "x-guidance" key out of every %json item (xgrammar would read it as a property)."""
    out, pos = [], 0
    key = ', "x-guidance": '
    while (i := lark.find(key, pos)) >= 0:
        j = lark.index("}", i) + 1
        out.append(lark[pos:i])
        pos = j
    return "".join(out) + lark[pos:]


# --------------------------------------------------------------------------------------------- measuring
def allowed_ids(row: np.ndarray, n_words: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:n_words])


def walk(lib, compiled, n_words: int, steps: int, seed: int) -> tuple[list[float], int]:
    """Mask-fill seconds per step along a seeded random path; and the tokens taken."""
    rng = np.random.default_rng(seed)
    m = lib.matcher(compiled)
    row = np.zeros((n_words + 31) // 32, np.int32)
    times, taken = [], 0
    for _ in range(steps):
        if lib.done(m):
            break
        t0 = time.perf_counter()
        lib.fill(m, row)
        times.append(time.perf_counter() - t0)
        ids = allowed_ids(row, n_words)
        if len(ids) == 0:
            break
        tok = int(rng.choice(ids))
        if tok == lib.v.eos_id or not lib.accept(m, tok):
            break
        taken += 1
    return times, taken


def bench(args) -> dict:
    results = {}
    libs = [LLGuidance]
    try:
        import xgrammar  # noqa: F401 - the comparison only: not a dependency of the runtime
        libs.append(XGrammar)
    except ImportError:
        print("[structured_cpu] xgrammar is not installed (pip install xgrammar): llguidance only")
    for tok_name, tokenizer in load_tokenizers().items():
        vocab_of(tokenizer)                          # the shared byte table is not either library's cost
        for lib_cls in libs:
            t0 = time.perf_counter()
            lib = lib_cls(tokenizer)
            init_s = time.perf_counter() - t0
            results[(tok_name, lib.name, "tokenizer init", "s")] = init_s
            for case, c in CASES.items():
                t0 = time.perf_counter()
                try:
                    compiled = lib.compile(c)
                except Exception as exc:  # noqa: BLE001 - a library that cannot take the case: say so
                    print(f"[structured_cpu] {tok_name} {lib.name} {case}: cannot compile: {exc}")
                    continue
                compile_s = time.perf_counter() - t0
                times, taken = [], 0
                for seed in range(args.walks):
                    t, n = walk(lib, compiled, lib.v.n_words, args.steps, seed)
                    times += t
                    taken += n
                ms = [lib.matcher(compiled) for _ in range(args.batch)]
                out = np.zeros((args.batch, (lib.v.n_words + 31) // 32), np.int32)
                lib.fill_batch(ms, out)                  # warm the pool
                t0 = time.perf_counter()
                for _ in range(5):
                    lib.fill_batch(ms, out)
                batch_s = (time.perf_counter() - t0) / 5
                results[(tok_name, lib.name, f"{case}: compile", "ms")] = compile_s * 1e3
                results[(tok_name, lib.name, f"{case}: mask per token, median", "us")] = statistics.median(times) * 1e6
                results[(tok_name, lib.name, f"{case}: mask per token, p90", "us")] = \
                    float(np.percentile(times, 90)) * 1e6
                results[(tok_name, lib.name, f"{case}: mask per token, max", "us")] = max(times) * 1e6
                results[(tok_name, lib.name, f"{case}: batch {args.batch} fill (first step)", "us")] = batch_s * 1e6
                results[(tok_name, lib.name, f"{case}: tokens walked", "tokens")] = taken
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=48, help="tokens per random walk (default 48)")
    ap.add_argument("--walks", type=int, default=4, help="random walks per case (default 4)")
    ap.add_argument("--batch", type=int, default=64, help="matchers in the batched fill (default 64)")
    args = ap.parse_args(argv)
    results = bench(args)
    for (tok_name, lib, metric, unit), value in results.items():
        other = "xgrammar" if lib == "llguidance" else "llguidance"
        base = results.get((tok_name, other, metric, unit))
        record("structured_cpu", f"{tok_name} / {lib}", metric, value, unit, other if base is not None else None,
               base, None, library=lib, tokenizer=tok_name)
    print(json.dumps({"cases": list(CASES), "steps": args.steps, "walks": args.walks, "batch": args.batch}))


if __name__ == "__main__":
    main()
