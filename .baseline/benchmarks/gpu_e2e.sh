#!/usr/bin/env bash
# One device call: install, GPU tests of the engine, load check (RSS + reference vs HF), end-to-end bench
# (ours vs HF vs the gpt-fast anchor). Logs and JSON lines land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # offline machine: wheels carried in for what it lacks (mistral_common and its needs)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
# the source tree on PYTHONPATH (pixtral_rt maps kernels/ itself); native extension built in place
python setup.py -q build_ext --inplace > "$OUT/install.log" 2>&1; grep -i "not built\|error" "$OUT/install.log" | head -3
python -c "import pixtral_rt.preprocess as p; print('preprocess backend:', p.backend_info())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
STAGES=${STAGES:-tests,load,anchor,e2e}
if [[ $STAGES == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q -rs ${TESTS:-tests/test_engine_gpu.py} -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error|tokens are the reference" | tail -25
fi
[[ $STAGES == *pre* ]] && timeout 120 python benchmarks/bench_preprocess.py 2>&1 | tee "$OUT/preprocess.log" | grep "^\[" | tail -12
if [[ $STAGES == *load* || $STAGES == *e2e* ]]; then
  [ -f /tmp/p12b/params.json ] || python -m pixtral_rt.random_weights /tmp/p12b --preset Pixtral-12B-2409 --device cuda 2>&1 | tail -1
fi
[[ $STAGES == *load* ]] && timeout 180 python benchmarks/bench_load.py --model /tmp/p12b 2>&1 | tee "$OUT/load.log" | grep -v Warn | tail -6
[[ $STAGES == *anchor* ]] && timeout 240 python benchmarks/gptfast_anchor.py 2>&1 | tail -2
[[ $STAGES == *e2e* ]] && timeout 300 python benchmarks/bench_e2e.py --model /tmp/p12b ${E2E_ARGS:-} \
  $( [ -f "$OUT/gptfast.jsonl" ] && echo --anchor-json "$OUT/gptfast.jsonl" ) 2>&1 | tee "$OUT/e2e.log" | grep -v Warn | tail -20
if [[ $STAGES == *cli* ]]; then  # the user's command on the GPU, through the real loader
  python -c "import numpy as n, PIL.Image as I; I.fromarray(n.random.default_rng(0).integers(0,256,(700,1100,3),dtype=n.uint8)).save('/tmp/cli.png')"
  python -m pixtral_rt.generate --model /tmp/p12b --image /tmp/cli.png --prompt "Describe the image." --max-tokens 24 \
    --json 2>"$OUT/cli_err.log" | tee "$OUT/cli.json" | cut -c1-400; echo "rc=$?"; tail -3 "$OUT/cli_err.log"
  python -m pixtral_rt.generate --model /tmp/p12b --image /tmp/cli.png --prompt "Describe." --max-tokens 16 --temperature 0.7 \
    --top-p 0.9 --seed 1 2>&1 | tail -3
  printf 'Hello\n/image /tmp/cli.png\nWhat is in it?\n/quit\n' | python -m pixtral_rt.generate --model /tmp/p12b --chat \
    --max-tokens 8 --json 2>/dev/null | cut -c1-200
  python -m pixtral_rt.generate --model /tmp/p12b --image /tmp/nope.png --prompt x; echo "missing image rc=$?"
fi
echo done
