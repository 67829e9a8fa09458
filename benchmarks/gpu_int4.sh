#!/usr/bin/env bash
# Device calls for the int4 (W4A16) work (issue 22). STAGES (comma list):
#   tests   GPU tests of the int4 kernels and decoder (tests/test_int4_{gemv,gemm,dequant}.py, test_decoder_int4.py)
#           and the sm_90 compile check
#   bench   kernel microbenchmarks vs bf16 and FP8 in the same run, with a tile sweep (benchmarks/bench_int4.py)
#   e2e     bench_fp8 --runs bf16,fp8,int4 on random Pixtral-12B: decode tok/s at 1k context and 1-image TTFT of
#           each engine, bf16 the baseline, floors from the measured copy bandwidth ($E2E_ARGS to change)
#   large   bench_fp8 --runs int4 on random Pixtral-Large drawn on the GPU in 4 bits: decode at 1k context,
#           1-image TTFT, the KV pool that fits with 8 GB kept free ($LARGE_ARGS to change)
#   cli     python -m pixtral_rt.generate --random-weights Pixtral-12B-2409 --quantization int4 (--json: decode
#           tok/s of the untuned int4 engine, and bf16 / fp8 the same way)
# Logs and JSON lines land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_CACHE=${PIXTRAL_RT_CACHE:-/tmp/pixtral_rt_cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # offline machine: wheels for what it lacks (mistral_common, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
STAGES=${STAGES:-tests,bench}
if [[ $STAGES == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-420} python -m pytest -q -rs ${TESTS:-tests/test_int4_gemv.py tests/test_int4_gemm.py \
    tests/test_int4_dequant.py tests/test_decoder_int4.py} -m gpu -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" \
    | grep -E "passed|failed|FAILED|Error|seq |^E " | tail -30
fi
if [[ $STAGES == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-540} python -m benchmarks.bench_int4 ${BENCH_ARGS:---sweep} 2>&1 | tee "$OUT/bench.log" \
    | grep -v "skip\|Warn" | tail -${BENCH_TAIL:-90}
fi
if [[ $STAGES == *e2e* ]]; then
  timeout ${E2E_TIMEOUT:-420} python -m benchmarks.bench_fp8 ${E2E_ARGS:---random-weights Pixtral-12B-2409 --runs bf16,fp8,int4} \
    2>&1 | tee "$OUT/e2e.log" | grep -v "Warn\|it/s\|B/s" | tail -20
fi
if [[ $STAGES == *large* ]]; then
  timeout ${LARGE_TIMEOUT:-420} python -m benchmarks.bench_fp8 ${LARGE_ARGS:---random-weights Pixtral-Large-Instruct-2411 \
    --runs int4 --max-context 131072} 2>&1 | tee "$OUT/large.log" | grep -v "Warn\|it/s\|B/s" | tail -20
fi
if [[ $STAGES == *cli* ]]; then
  for q in "" "--quantization fp8" "--quantization int4"; do
    timeout 300 python -m pixtral_rt.generate --random-weights Pixtral-12B-2409 $q --prompt "Hi" --max-tokens 64 \
      --json 2>"$OUT/cli_err.log" | cut -c1-600; echo "rc=$? ($q)"; grep -v "it/s\|B/s" "$OUT/cli_err.log" | tail -3
  done
fi
echo done
