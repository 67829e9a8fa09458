#!/bin/bash
# One device call: GPU tests of the vision attention, the schedule sweep (benchmarks/sweep_vision_attention.py),
# then Nsight Compute on two variants (pipe use: tensor cores vs MUFU vs FMA); logs under $OUT.
# STAGES: any of tests,sweep,ncu (default all). NCU_A / NCU_B: the two variants' JSON for --profile.
export PYTHONUNBUFFERED=1 PIXTRAL_RT_NO_EXT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-tests,sweep,ncu}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $OUT/gpu.txt 2>&1
if [[ $STAGES == *tests* ]]; then
  timeout ${TEST_S:-200} python -m pytest -q -m gpu tests/test_vision_attention.py -p no:cacheprovider -W ignore \
    > $OUT/tests.log 2>&1; echo "tests rc=$?"
fi
if [[ $STAGES == *sweep* ]]; then
  timeout ${SWEEP_S:-330} python -m benchmarks.sweep_vision_attention $SWEEP_ARGS > $OUT/sweep.log 2>&1
  echo "sweep rc=$?"
fi
if [[ $STAGES == *ncu* ]]; then
  NCU_A=${NCU_A:-'{"bm": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "KV_DESC": true}'}
  NCU_B=${NCU_B:-'{"bm": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "KV_DESC": true, "maxnreg": 168}'}
  M=sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed.avg.per_cycle_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,gpu__time_duration.sum
  for v in A B; do
    spec=NCU_$v
    timeout 90 ncu --clock-control none -k regex:_vision_attention --launch-skip 1 --launch-count 1 --metrics $M \
      python -m benchmarks.sweep_vision_attention --profile "${!spec}" > $OUT/ncu_$v.log 2>&1; echo "ncu $v rc=$?"
  done
fi
echo "== tests"; grep -E "passed|failed|error|FAILED|Error" $OUT/tests.log 2>/dev/null | cut -c1-300 | tail -12
echo "== ncu"; for v in A B; do grep -E "gmma|pipe_xu|pipe_fma|pipe_alu|per_cycle|warps_active|registers|limit|duration|ERROR" $OUT/ncu_$v.log 2>/dev/null | head -14; done
echo "== sweep"; cat $OUT/gpu.txt
grep -E "failed|WRONG|Traceback|Error" $OUT/sweep.log | cut -c1-250 | head -12
grep -A9 "== best" $OUT/sweep.log
grep -E "RoPE pass" $OUT/sweep.log; grep -h "^\[" $OUT/sweep.log | grep -E "sdpa|rope_" | sed 's/  (NVIDIA.*)//' | cut -c1-160
