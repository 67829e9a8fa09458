#!/bin/bash
# One device call: install, GPU tests of the vision path, then the benchmarks; logs under $OUT.
export PYTHONUNBUFFERED=1 PIXTRAL_RT_NO_EXT=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $OUT/gpu.txt 2>&1
python -m pip install --no-build-isolation --no-deps -e . -q > $OUT/install.log 2>&1 || tail -5 $OUT/install.log
# the editable finder did not map pixtral_rt.kernels when run from the repo root (device run 1): link it
python -c "import pixtral_rt.kernels.vision_attention" 2>/dev/null || { ln -sfn ../kernels pixtral_rt/kernels; echo "linked pixtral_rt/kernels"; }
python -c "import pixtral_rt.kernels.vision_attention, pixtral_rt.kernels.rms_norm; print('import ok')"
timeout ${TEST_S:-85} python -m pytest -q -m gpu -x tests/test_vision_attention.py tests/test_vision_fast.py \
  -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc=$?"
timeout ${ATTN_S:-90} python -m benchmarks.bench_vision_attention > $OUT/bench_attention.log 2>&1; echo "attn rc=$?"
timeout ${ENC_S:-95} python -m benchmarks.bench_vision_encoder > $OUT/bench_encoder.log 2>&1; echo "enc rc=$?"
echo "== tests"; tail -15 $OUT/tests.log | grep -v Warning
echo "== encoder profile"; grep -A16 "Self CUDA" $OUT/bench_encoder.log | cut -c1-150 | head -18
grep -i "error\|Traceback" $OUT/bench_*.log | head -5
echo "== autotune"; grep autotune $OUT/bench_attention.log | cut -c1-600
echo "== results"; cat $OUT/gpu.txt
grep -h "^\[" $OUT/bench_attention.log $OUT/bench_encoder.log | sed 's/  (NVIDIA.*)//' | cut -c1-170
