#!/usr/bin/env bash
# One device call: install, GPU tests of the decoder kernels + decoder, then benchmarks. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
PIXTRAL_RT_NO_EXT=1 pip install --no-build-isolation --no-deps -e . -q > /tmp/pip.log 2>&1 || tail -5 /tmp/pip.log
T0=$(date +%s)
timeout ${TEST_S:-95} python -m pytest -q -p no:cacheprovider -s tests/test_rms_norm.py tests/test_silu_mul.py \
  tests/test_decode_attention.py tests/test_prefill_attention.py tests/test_decoder_fast.py -k "bf16 or graph or pixtral12b" \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$? $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|error|slot [01]:" "$OUT/tests.log" | tail -8
grep -E "^(FAILED|E  )" "$OUT/tests.log" | head -20
timeout ${PREFILL_S:-55} python benchmarks/bench_prefill_attention.py ${QUICK:-} > "$OUT/prefill.log" 2>&1; echo "prefill rc=$?"
timeout ${DECODE_S:-50} python benchmarks/bench_decode_attention.py ${QUICK:-} > "$OUT/decode.log" 2>&1; echo "decode rc=$?"
timeout ${STEP_S:-75} python benchmarks/bench_decode_step.py ${GPTFAST:-} > "$OUT/step.log" 2>&1; echo "step rc=$?"
echo "total $(( $(date +%s) - T0 ))s"
echo "=== summary"
grep -hE "_best|with_rope|matmul|copy" "$OUT/prefill.log" "$OUT/decode.log" | sed 's/  (NVIDIA.*//' | cut -c1-150
grep -hE "decode_step|floor" "$OUT/step.log" | sed 's/  (NVIDIA.*//' | cut -c1-150
grep -hE "Error|error" "$OUT/prefill.log" "$OUT/decode.log" "$OUT/step.log" | head -5
