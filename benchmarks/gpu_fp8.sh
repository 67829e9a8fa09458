#!/usr/bin/env bash
# Device calls for the FP8 decoder (issue 10). STAGES (comma list):
#   tests   GPU tests of the FP8 kernels and decoder (tests/test_fp8_{quant,gemv,gemm}.py, tests/test_decoder_fp8.py)
#   linear  kernel microbenchmarks + tile sweeps (benchmarks/bench_fp8_linear.py: decode W8A8 vs W8A16 vs bf16)
#   decode  bf16 / FP8 (decode w8a16) / FP8 (decode w8a8) engines on random Pixtral-12B drawn on the GPU:
#           decode tok/s at 1k context and 1-image TTFT (bench_fp8.py --runs bf16,fp8,fp8_w8a8)
#   e2e     bf16 vs FP8 engine on random Pixtral-12B written as real checkpoints (bf16 Mistral format and the
#           FP8 compressed-tensors HF layout), through the real loader (benchmarks/bench_fp8.py --quality)
#   cli     python -m pixtral_rt.generate on the FP8 checkpoint and with --quantization fp8 (--json)
#   large   Pixtral-Large FP8 on one GPU: weights generated on the device (bench_fp8.py --fp8-only)
# Logs and JSON lines land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # Pixtral-Large FP8 fills the GPU
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_CACHE=${PIXTRAL_RT_CACHE:-/tmp/pixtral_rt_cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # offline machine: wheels for what it lacks (mistral_common, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
python setup.py -q build_ext --inplace > "$OUT/install.log" 2>&1; grep -i "not built" "$OUT/install.log" | head -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
STAGES=${STAGES:-tests,linear}
BF=$PIXTRAL_RT_CACHE/random-12b-bf16; F8=$PIXTRAL_RT_CACHE/random-12b-fp8
if [[ $STAGES == *e2e* || $STAGES == *cli* ]]; then
  [ -f $BF/params.json ] || python -m pixtral_rt.random_weights $BF --preset Pixtral-12B-2409 --device cuda 2>&1 | tail -1
  [ -f $F8/config.json ] || python -m pixtral_rt.random_weights $F8 --preset Pixtral-12B-2409 --format hf \
    --quantization fp8 --device cuda 2>&1 | tail -1
  du -sh $BF $F8
fi
if [[ $STAGES == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-300} python -m pytest -q -rs ${TESTS:-tests/test_fp8_quant.py tests/test_fp8_gemv.py tests/test_fp8_gemm.py tests/test_rms_norm.py tests/test_decoder_fp8.py} \
    -m gpu -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error|seq |^E " | tail -30
fi
if [[ $STAGES == *linear* ]]; then
  timeout ${LINEAR_TIMEOUT:-300} python -m benchmarks.bench_fp8_linear ${LINEAR_ARGS:---rows 1,16,64} 2>&1 | tee "$OUT/linear.log" \
    | grep -v "skip\|Warn" | tail -${LINEAR_TAIL:-60}
fi
if [[ $STAGES == *decode* ]]; then
  timeout ${DECODE_TIMEOUT:-300} python -m benchmarks.bench_fp8 --random-weights Pixtral-12B-2409 \
    --runs ${DECODE_RUNS:-bf16,fp8,fp8_w8a8} 2>&1 | tee "$OUT/decode.log" | grep "^\[fp8\]\|NOT" | tail -12
fi
if [[ $STAGES == *e2e* ]]; then
  timeout ${E2E_TIMEOUT:-420} python -m benchmarks.bench_fp8 --model $BF --fp8-model $F8 --quality 2>&1 \
    | tee "$OUT/e2e.log" | grep -v "Warn\|it/s\]" | tail -30
fi
if [[ $STAGES == *cli* ]]; then
  python -c "import numpy as n, PIL.Image as I; I.fromarray(n.random.default_rng(0).integers(0,256,(700,1100,3),dtype=n.uint8)).save('/tmp/cli.png')"
  for m in "--model $F8" "--model $BF --quantization fp8"; do
    python -m pixtral_rt.generate $m --image /tmp/cli.png --prompt "Describe the image." --max-tokens 24 --json \
      2>"$OUT/cli_err.log" | cut -c1-400; echo "rc=$?"; grep -v "it/s\|B/s" "$OUT/cli_err.log" | tail -3
  done
fi
if [[ $STAGES == *large* ]]; then
  timeout ${LARGE_TIMEOUT:-540} python -m benchmarks.bench_fp8 --random-weights Pixtral-Large-Instruct-2411 --fp8-only \
    --tokens 64 2>&1 | tee "$OUT/large.log" | grep -v "Warn\|it/s\]" | tail -20
fi
echo done
