#!/bin/bash
# One device call: GPU tests of the vision path, then the attention + encoder benchmarks; logs under $OUT.
# No install: the repo root on PYTHONPATH (pixtral_rt/__init__.py maps kernels/ as pixtral_rt.kernels).
export PYTHONUNBUFFERED=1 PIXTRAL_RT_NO_EXT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $OUT/gpu.txt 2>&1
python -c "import pixtral_rt.kernels.vision_attention, pixtral_rt.kernels.rope_2d; print('import ok')" || exit 1
timeout ${TEST_S:-150} python -m pytest -q -m gpu tests/test_vision_attention.py tests/test_vision_fast.py tests/test_vision_buckets.py \
  -p no:cacheprovider -W ignore > $OUT/tests.log 2>&1; echo "tests rc=$?"
timeout ${ATTN_S:-80} python -m benchmarks.bench_vision_attention > $OUT/bench_attention.log 2>&1; echo "attn rc=$?"
timeout ${ENC_S:-85} python -m benchmarks.bench_vision_encoder > $OUT/bench_encoder.log 2>&1; echo "enc rc=$?"
echo "== tests"; grep -E "passed|failed|error|FAILED|Error" $OUT/tests.log | cut -c1-300 | tail -12
echo "== encoder profile"; grep -A10 "Self CUDA" $OUT/bench_encoder.log | awk '{print $1, $(NF-4), $(NF-1)}' | head -12
grep -i "error\|Traceback\|failed" $OUT/bench_*.log | head -5
echo "== autotune"; grep autotune $OUT/bench_attention.log | cut -c1-400
echo "== results"; cat $OUT/gpu.txt
grep -h "^\[" $OUT/bench_attention.log $OUT/bench_encoder.log | grep -v transformers | sed 's/  (NVIDIA.*)//' \
  | sed 's/useful_tflops/tf/; s/ TFLOP\/s//' | cut -c1-150
