#!/usr/bin/env bash
# Device calls for the first-contact and one-engine work (issues 19, 20). Logs and JSON lines land in $OUT.
#   STAGES=tests        GPU tests ($TESTS; default: timings on the fast model, import names, engine + serving)
#   STAGES=e2e          bench_e2e on the engine that runs (the serving engine, batch 1)
#   STAGES=cli          the user's command on random Pixtral-12B weights (the timing summary line)
#   STAGES=serve        bench_serve ($SERVE_ARGS)
#   STAGES=preempt      bench_serve without max_tokens (clients leave after the workload's length), with the
#                       default KV pool, then with --kv-tokens $PREEMPT_KV (default 40000: 64 users preempt):
#                       throughput with and without preemption, same machine, same call (issue 20)
#   STAGES=profile      benchmarks/profile_ttft.py (text-1k TTFT: idle gaps, runtime calls, allocator,
#                       --sync-debug) in this tree, then in BASELINE_TREE with its --backend, same call
# BASELINE_TREE=DIR: run the e2e stage in DIR too (an older tree carried along), same machine, same call. That
#   tree's own bench_e2e runs with its own flags: BASELINE_BACKEND (default fast: the batch-1 engine that tree
#   still has; this tree has one engine and no --backend flag; BASELINE_BACKEND=none passes no --backend).
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_CACHE=${PIXTRAL_RT_CACHE:-/tmp/pixtral_rt_cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # offline machine: wheels for what it lacks, appended so the image's own packages win
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
python setup.py -q build_ext --inplace > "$OUT/install.log" 2>&1; grep -i "not built" "$OUT/install.log" | head -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
STAGES=${STAGES:-tests}
E2E="--random-weights Pixtral-12B-2409 --skip-hf --cases ${E2E_CASES:-a_1img_1024,b_4imgs_mixed,c_text_1k} --tokens 128"
if [[ $STAGES == *tests* ]]; then
  # one pytest process per file: a module's full-size engines are not all back with the allocator when the
  # next module loads its own (the first combined run ran out of memory in the second 12B module)
  for t in ${TESTS:-tests/test_timings.py tests/test_import_names.py}; do
    timeout ${TEST_TIMEOUT:-300} python -m pytest -q -rs $t -s -p no:cacheprovider 2>&1 | tee -a "$OUT/tests.log" \
      | grep -E "passed|failed|FAILED|Error|^E |identical|logprob" | tail -8
  done
fi
if [[ $STAGES == *e2e,* || $STAGES == *e2e ]]; then
  timeout 300 python benchmarks/bench_e2e.py $E2E 2>&1 | tee "$OUT/e2e.log" | grep "^\[" | tail -12
fi
if [[ -n ${BASELINE_TREE:-} && $STAGES == *e2e* ]]; then
  BASELINE_FLAGS="--backend ${BASELINE_BACKEND:-fast}"; [[ ${BASELINE_BACKEND:-} == none ]] && BASELINE_FLAGS=""
  mkdir -p "$OUT/baseline"; (cd "$BASELINE_TREE" && PYTHONPATH=$PWD:/tmp/site PIXTRAL_RT_COMMIT=${BASELINE_COMMIT:-baseline} OUT=$OUT/baseline \
     timeout 300 python benchmarks/bench_e2e.py $E2E $BASELINE_FLAGS 2>&1) \
     | tee "$OUT/e2e_baseline.log" | grep "^\[" | tail -12
fi
if [[ $STAGES == *profile* ]]; then
  timeout ${PROFILE_TIMEOUT:-200} python benchmarks/profile_ttft.py --sync-debug ${PROFILE_ARGS:-} 2>&1 \
    | tee "$OUT/profile.log" | grep "^\[\|sync\|Warn" | tail -${PROFILE_TAIL:-60}
  if [[ -n ${BASELINE_TREE:-} ]]; then
    (cd "$BASELINE_TREE" && PYTHONPATH=$PWD:/tmp/site timeout ${PROFILE_TIMEOUT:-200} python ../benchmarks/profile_ttft.py \
       --backend ${BASELINE_BACKEND:-fast} --tag ${BASELINE_COMMIT:-baseline}_${BASELINE_BACKEND:-fast} ${PROFILE_ARGS:-} 2>&1) \
      | tee "$OUT/profile_baseline.log" | grep "^\[" | tail -${PROFILE_TAIL:-60}
  fi
fi
if [[ $STAGES == *cli* ]]; then
  python -c "import numpy as n, PIL.Image as I; I.fromarray(n.random.default_rng(0).integers(0,256,(700,1100,3),dtype=n.uint8)).save('/tmp/cli.png')"
  python -m pixtral_rt.generate --random-weights Pixtral-12B-2409 --image /tmp/cli.png --prompt "Describe the image." \
    --max-tokens 32 2>&1 | tee "$OUT/cli.log" | grep -v "it/s\|B/s" | tail -3
fi
if [[ $STAGES == *serve* ]]; then
  timeout ${SERVE_TIMEOUT:-480} python benchmarks/bench_serve.py ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.log" | grep -v Warn | tail -30
fi
if [[ $STAGES == *preempt* ]]; then
  for kv in "" "--kv-tokens ${PREEMPT_KV:-40000}"; do
    echo "--- bench_serve --no-max-tokens ${kv:-(default pool)}"
    timeout ${SERVE_TIMEOUT:-280} python benchmarks/bench_serve.py --no-baseline --engine process \
      --levels ${PREEMPT_LEVELS:-64} --no-max-tokens $kv --log "$OUT/preempt_server.log" 2>&1 \
      | tee -a "$OUT/preempt.log" | grep -v Warn | tail -12
  done
fi
echo done
