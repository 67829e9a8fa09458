#!/usr/bin/env bash
# One device call per stage group for the serving engine (issue 9). STAGES=tests,paged (call 1) or serve (call 2);
# STAGES=controls: the sampling controls (issue 23); STAGES=structured: constrained decoding's step overhead,
# grammar compile and tool-call round trip (bench_constrained_step, issue 23).
# Logs and JSON lines land in $OUT; the embedded random Pixtral-12B is written once to $PIXTRAL_RT_CACHE.
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_CACHE=${PIXTRAL_RT_CACHE:-/tmp/pixtral_rt_cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # offline machine: wheels for what it lacks (mistral_common, fastapi, uvicorn, openai, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
python setup.py -q build_ext --inplace > "$OUT/install.log" 2>&1; grep -i "not built" "$OUT/install.log" | head -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
STAGES=${STAGES:-tests,paged}
if [[ $STAGES == *tests* ]]; then
  python -c "from pixtral_rt.loading import default_random_model; import torch; default_random_model(torch.device('cuda'))" 2>&1 | tail -1
  timeout ${TEST_TIMEOUT:-360} python -m pytest -q -rs ${TESTS:-tests/test_paged_attention.py tests/test_serving_gpu.py} \
    -m gpu -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error|identical|logprob|^E " | tail -30
fi
if [[ $STAGES == *paged* ]]; then
  timeout 180 python benchmarks/bench_paged_attention.py ${PAGED_ARGS:-} 2>&1 | tee "$OUT/paged.log" | grep -v Warn | tail -24
fi
if [[ $STAGES == *batch* ]]; then
  timeout 240 python benchmarks/bench_decode_batch.py 2>&1 | tee "$OUT/decode_batch.log" | grep "^\[" | tail -8
fi
if [[ $STAGES == *controls* ]]; then  # sampling controls: the kernel tests on the GPU, the kernel, the decode-step overhead
  timeout 300 python -m pytest -q -p no:cacheprovider tests/test_logits_process.py tests/test_sampling_controls.py 2>&1 \
    | tee "$OUT/controls_tests.log" | tail -3
  timeout 300 python benchmarks/bench_logits_process.py 2>&1 | tee "$OUT/logits_process.log" | grep "^\[" | tail -16
fi
if [[ $STAGES == *structured* ]]; then  # structured output through the engine loop (12B random weights)
  python -c "from pixtral_rt.loading import default_random_model; import torch; default_random_model(torch.device('cuda'))" 2>&1 | tail -1
  timeout ${STRUCTURED_TIMEOUT:-240} python benchmarks/bench_constrained_step.py ${STRUCTURED_ARGS:-} 2>&1 \
    | tee "$OUT/constrained_step.log" | grep -v Warn | tail -16
fi
if [[ $STAGES == *cli* ]]; then  # the user's command on the GPU (serving backend, embedded random 12B)
  python -c "import numpy as n, PIL.Image as I; I.fromarray(n.random.default_rng(0).integers(0,256,(700,1100,3),dtype=n.uint8)).save('/tmp/cli.png')"
  python -m pixtral_rt.generate --image /tmp/cli.png --prompt "Describe the image." --max-tokens 24 --json \
    2>"$OUT/cli_err.log" | tee "$OUT/cli.json" | cut -c1-300; echo "rc=$?"; grep -v "it/s\|B/s" "$OUT/cli_err.log" | tail -2
  printf 'Hello\n/image /tmp/cli.png\nWhat is in it?\nAnd the colours?\n/quit\n' | python -m pixtral_rt.generate --chat \
    --max-tokens 8 --json 2>/dev/null | cut -c1-160
fi
if [[ $STAGES == *serve* ]]; then
  python -c "from pixtral_rt.loading import default_random_model; import torch; default_random_model(torch.device('cuda'))" 2>&1 | tail -1
  timeout ${SERVE_TIMEOUT:-540} python benchmarks/bench_serve.py ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.log" | grep -v Warn | tail -30
fi
echo done
