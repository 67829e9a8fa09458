#!/usr/bin/env bash
# Tensor parallelism on the multi-GPU machine (issue 11; kind nvidia-h200-x2, or -x4). STAGES (comma list):
#   tests   tests/test_tp_gpu.py's 2-GPU test: TP=2 vs TP=1 over NCCL with decode graphs, full-size random 12B,
#           for (lm_head, all-reduce) = (replicated, nccl), (vocab, nccl), (replicated, symm) (the CPU/gloo
#           tests run in CI)
# One call of the device tool runs at most 10 minutes: split the stages, e.g. STAGES=tests, then STAGES=ar,12b,
# then STAGES=large (TP=4 on the 4-GPU kind).
#   ar      all-reduce per decode step (NCCL, symmetric-memory one/two-shot) vs NCCL bus bandwidth, and the
#           lm_head's GEMM saved vs its logits all-gather (torchrun, benchmarks/bench_allreduce.py)
#   12b     engine TP=1 vs TP=2 on random Pixtral-12B written once (decode, TTFT), lm_head replicated and
#           vocab-parallel x all-reduce NCCL and symmetric-memory one-shot (the fastest become the defaults)
#   large   Pixtral-Large bf16 TP=$TP (weights drawn on the GPUs)
#   one     ONE GPU is enough: the TP code path with a process group of one (PIXTRAL_RT_TP_ONE_RANK) vs the
#           plain engine, full-size random 12B, and TP=2 with both ranks on the GPU over gloo
#           (PIXTRAL_RT_TP_SAME_GPU) vs TP=1, 12B and Pixtral-Large's first 4 layers (tests/test_tp_gpu.py;
#           the 2-GPU test skips there); bench_allreduce with one rank as a smoke run (log only: a group of
#           one says nothing of the cost between GPUs)
set -o pipefail
export PYTHONUNBUFFERED=1 PIXTRAL_RT_COMMIT=${PIXTRAL_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1        # never enable NVLink multicast
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIXTRAL_RT_CACHE=${PIXTRAL_RT_CACHE:-/tmp/pixtral_rt_cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
python setup.py -q build_ext --inplace > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STAGES=${STAGES:-tests,ar}; TP=${TP:-2}
BF=$PIXTRAL_RT_CACHE/random-12b-bf16
if [[ $STAGES == *tests* ]]; then
  python -c "from pixtral_rt.engine import default_random_model; import torch; default_random_model(torch.device('cuda'))" 2>&1 | tail -1
  timeout ${TEST_TIMEOUT:-500} python -m pytest -q -rs -m gpu tests/test_tp_gpu.py -k test_tp2_agrees_with_tp1 -s \
    -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error|identical|^E " | tail -20
fi
if [[ $STAGES == *one* ]]; then
  timeout ${TEST_TIMEOUT:-400} python -m pytest -q -rs -m gpu tests/test_tp_gpu.py -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests_one_gpu.log" | grep -E "passed|failed|FAILED|Error|^E |SKIPPED|identical" | tail -20
  mkdir -p "$OUT/smoke"
  OUT=$OUT/smoke timeout 90 torchrun --nproc_per_node 1 -m benchmarks.bench_allreduce 2>&1 \
    | tee "$OUT/smoke/allreduce_one_rank.log" | grep -E "^\[|NOT MEASURED|Error" | tail -12
fi
if [[ $STAGES == *ar* ]]; then
  timeout 180 torchrun --nproc_per_node $TP -m benchmarks.bench_allreduce 2>&1 | tee "$OUT/allreduce.log" \
    | grep -E "^\[|NOT MEASURED" | tail -16
fi
if [[ $STAGES == *12b* ]]; then
  [ -f $BF/params.json ] || python -m pixtral_rt.random_weights $BF --preset Pixtral-12B-2409 --device cuda 2>&1 | tail -1
  timeout ${B12_TIMEOUT:-560} python -m benchmarks.bench_tp --model $BF --tp 1,$TP --lm-head replicated,vocab \
    --allreduce nccl,symm 2>&1 | tee "$OUT/tp12b.log" | grep -v "it/s\]" | tail -24
fi
if [[ $STAGES == *large* ]]; then
  timeout ${LARGE_TIMEOUT:-500} python -m benchmarks.bench_tp --random-weights Pixtral-Large-Instruct-2411 --tp $TP \
    --tokens 64 2>&1 | tee "$OUT/tplarge.log" | grep -v "it/s\]" | tail -20
fi
echo done
