#!/usr/bin/env bash
# One device call: install, GPU tests of the decoder kernels + decoder, then benchmarks. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 PIXTRAL_RT_NO_EXT=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
python -m pip install --no-build-isolation --no-deps -e . -q > /tmp/pip.log 2>&1 || tail -5 /tmp/pip.log
# the editable finder may not map pixtral_rt.kernels (seen on the device): link it and use the tree directly
python -c "import pixtral_rt.kernels.rms_norm" 2>/dev/null || { ln -sfn ../kernels pixtral_rt/kernels; echo "linked pixtral_rt/kernels"; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import pixtral_rt.kernels.decode_attention, pixtral_rt.decoder; print('import ok')"
T0=$(date +%s)
timeout ${TEST_S:-100} python -m pytest -q -p no:cacheprovider -s tests/test_rms_norm.py tests/test_silu_mul.py \
  tests/test_gemv.py tests/test_decode_attention.py tests/test_prefill_attention.py tests/test_decoder_fast.py \
  -k "bf16 or graph or pixtral12b" > "$OUT/tests.log" 2>&1; echo "tests rc=$? $(( $(date +%s) - T0 ))s"
grep -E "passed|failed|fast err" "$OUT/tests.log" | tail -6
grep -E "^(FAILED|E  )" "$OUT/tests.log" | cut -c1-200 | head -16
timeout ${PREFILL_S:-50} python benchmarks/bench_prefill_attention.py ${QUICK:-} > "$OUT/prefill.log" 2>&1; echo "prefill rc=$?"
timeout ${DECODE_S:-45} python benchmarks/bench_decode_attention.py ${QUICK:-} > "$OUT/decode.log" 2>&1; echo "decode rc=$?"
timeout ${STEP_S:-80} python benchmarks/bench_decode_step.py > "$OUT/step.log" 2>&1; echo "step rc=$?"
echo "total $(( $(date +%s) - T0 ))s"
echo "=== summary"
grep -hiE "Error|Traceback" "$OUT/prefill.log" "$OUT/decode.log" "$OUT/step.log" | head -4 | cut -c1-200
grep -hE "_best|with_rope|matmul|copy band" "$OUT/prefill.log" "$OUT/decode.log" | sed 's/  (NVIDIA.*//; s/\[[a-z_]*\] //' | cut -c1-140
grep -hE "gemv|graph_|eager|floor [0-9.]* ms|config from" "$OUT/step.log" | sed 's/  (NVIDIA.*//; s/\[decode_step\] //' | cut -c1-140
