#!/usr/bin/env bash
# One device call (<= 240 s): GPU tests of the decode-chain variants (gemv pdl/glu, PDL norm/silu, decode
# attention PDL, full-width 2-layer decoder per fusion incl. bitwise none == none+pdl), then the graph-replayed
# decode step A/B in one process (bench_decode_step.py: none x2, none+pdl, fused2, fused2+pdl at 1k and 4k).
set -u
export PYTHONUNBUFFERED=1 PIXTRAL_RT_NO_EXT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
timeout ${TEST_S:-100} python -m pytest -v -p no:cacheprovider -s tests/test_gemv.py tests/test_decode_attention.py \
  tests/test_decoder_fast.py -k "pdl_bf16 or glu_bf16 or pdl_chain or bf16_pdl or full_width" \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$? $(( $(date +%s) - T0 ))s"
echo "passed $(grep -cE ' PASSED' "$OUT/tests.log")"; grep -E "FAILED|ERROR|fast err|rel vs none|max abs diff" "$OUT/tests.log" | cut -c1-200 | head -24
tail -1 "$OUT/tests.log" | cut -c1-200
timeout ${STEP_S:-118} python benchmarks/bench_decode_step.py > "$OUT/step.log" 2>&1; echo "step rc=$? $(( $(date +%s) - T0 ))s"
echo "=== summary"
grep -hiE "Error|Traceback|failed" "$OUT/step.log" | head -6 | cut -c1-250
grep -hE "floor [0-9.]* ms|w13_glu" "$OUT/step.log" | sed 's/  (NVIDIA.*//; s/\[decode_step\] //' | cut -c1-170
sed -n '/=== decode step/,$p' "$OUT/step.log"
