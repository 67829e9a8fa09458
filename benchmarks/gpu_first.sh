#!/usr/bin/env bash
# One device call for issue 12 (first-request latency). Stages (STAGES, comma-separated):
#   tests    GPU tests: nothing compiles / tunes / captures on the request path, vision graphs vs reference
#   first    bench_e2e --first-request: cold vs warm user-visible TTFT, each case in a fresh process
#   buckets  bench_vision_buckets: encoder time against the patch count (eager, pow2 graph, fine graph)
#   jpeg     bench_jpeg_decode: nvJPEG vs Pillow, time and pixel differences
#   spread   first_request --processes $SPREAD_PROCESSES (5): the same requests in fresh processes, the spread of
#            their warm TTFT (max / min, target <= 1.05; issue 21)
# Logs and JSON lines land in $OUT; a short table is printed last.
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
python setup.py -q build_ext --inplace > "$OUT/install.log" 2>&1; grep -i "not built\|error" "$OUT/install.log" | head -3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STAGES=${STAGES:-tests,first,buckets,jpeg}
if [[ $STAGES == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-300} python -m pytest -q -rs -m gpu ${TESTS:-tests/test_compile_events.py} -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error|after load|->" | tail -30
fi
[[ $STAGES == *first* ]] && timeout 420 python -m benchmarks.bench_e2e --first-request ${FIRST_ARGS:-} 2>&1 \
  | tee "$OUT/first.log" | grep -v Warn | tail -12
[[ $STAGES == *buckets* ]] && timeout 300 python -m benchmarks.bench_vision_buckets 2>&1 | tee "$OUT/buckets.log" \
  | grep -v Warn | tail -16
[[ $STAGES == *jpeg* ]] && timeout 120 python -m benchmarks.bench_jpeg_decode 2>&1 | tee "$OUT/jpeg.log" | grep "^\[" | tail -8
[[ $STAGES == *spread* ]] && timeout ${SPREAD_TIMEOUT:-400} python -m benchmarks.first_request \
  --processes ${SPREAD_PROCESSES:-5} --cases ${SPREAD_CASES:-a_1img_1024} 2>&1 | tee "$OUT/spread.log" | grep -v Warn | tail -14
echo done
