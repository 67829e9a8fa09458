#!/usr/bin/env bash
# One device call (<= 270 s): GPU tests of the decoder kernels + decoder (new paths), then the graph-replayed
# decode step (old vs fused vs fused+PDL in the same run) and the RoPE/cache-write + prefill bench. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 PIXTRAL_RT_NO_EXT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
timeout ${TEST_S:-95} python -m pytest -v -p no:cacheprovider -s tests/test_gemv.py tests/test_prefill_attention.py \
  tests/test_decode_attention.py tests/test_decoder_fast.py \
  -k "fused_bf16 or rope_store_kv_bf16 or bf16_pdl or full_width or (test_prefill_bf16 and not configs) or batch64" \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$? $(( $(date +%s) - T0 ))s"
grep -cE "PASSED" "$OUT/tests.log"; grep -E "FAILED|ERROR|fast err" "$OUT/tests.log" | cut -c1-220 | head -12
tail -1 "$OUT/tests.log" | cut -c1-200
timeout ${STEP_S:-105} python benchmarks/bench_decode_step.py > "$OUT/step.log" 2>&1; echo "step rc=$? $(( $(date +%s) - T0 ))s"
timeout ${PREFILL_S:-40} python benchmarks/bench_prefill_attention.py --rope > "$OUT/prefill.log" 2>&1; echo "prefill rc=$? $(( $(date +%s) - T0 ))s"
echo "=== summary"
grep -hiE "Error|Traceback|failed" "$OUT/step.log" "$OUT/prefill.log" | head -6 | cut -c1-250
grep -hE "floor [0-9.]* ms|fused_gemv|sum_of|graph_" "$OUT/step.log" | sed 's/  (NVIDIA.*//; s/\[decode_step\] //' | cut -c1-150
grep -hE "rope_store|with_rope|_best" "$OUT/prefill.log" | sed 's/  (NVIDIA.*//; s/\[prefill_attention\] //' | cut -c1-150
