#!/usr/bin/env bash
# One GPU-machine call: install the carried wheels, run the GPU tests, then the named benchmarks,
# each under its own time limit, every log under $OUT. Usage (from the repository root, on the GPU
# machine, with .whl carried):  bash benchmarks/gpu_session.sh [tests] [load] [sprint] [backbone] [e2e] [moe] [attention] [profile] [batch] [sprint_profile] [quant] [tiers]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/card.txt"
for what in "$@"; do
  case "$what" in
    tests)  # the GPU tests, and the parity and SPRINT suites under the machine's torch/transformers
      timeout 300 python3 -m pytest -q -m gpu tests/test_runtime.py tests/test_moe.py tests/test_attention.py tests/test_qmm.py tests/test_memory.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
      timeout 200 python3 -m pytest -q -x tests/test_parity.py tests/test_sprint.py tests/test_sampling.py \
          2>&1 | tee "$OUT/cpu_tests_on_gpu_box.log" | tail -3 ;;
    load)  # the sweep: chat (32 steps, 128 tokens) and T2I 512 px at 1, 8, 32, 64 clients
      timeout 400 python3 benchmarks/load_test.py --full --device cuda --task chat,t2i --size 512x512 --steps 32 --t2i-steps 8 \
          --max-tokens 128 --clients 1,8,32,64 --requests 8 --requests-per-client 4 --max-queue 128 --warmup 0 \
          2>&1 | tee "$OUT/load_test.log" | tail -14 ;;
    batch)  # a batch through the sampler: the fused greedy pick vs the reference, forward vs other time
      timeout 240 python3 benchmarks/bench_batch.py --requests 1,32 2>&1 | tee "$OUT/bench_batch.log" | tail -10 ;;
    sprint_profile)  # torch.profiler over one T2I generate: baseline vs SPRINT (per-forward overhead)
      timeout 200 python3 benchmarks/profile_sprint.py --device cuda --full 2>&1 | tee "$OUT/profile_sprint.log" | tail -4 ;;
    attention)
      timeout 240 python3 benchmarks/bench_attention.py --sweep 2>&1 | tee "$OUT/bench_attention.log" | tail -9 ;;
    moe)
      timeout 300 python3 benchmarks/bench_moe.py --sweep --tokens ${MOE_TOKENS:-32,64,1024,2048} 2>&1 | tee "$OUT/bench_moe.log" | tail -10 ;;
    sprint)
      timeout 170 python3 benchmarks/bench_sprint.py --device cuda --full --reps 2 2>&1 \
          | tee "$OUT/bench_sprint.log" | tail -14 ;;
    e2e)
      timeout 300 python3 benchmarks/bench_e2e.py 2>&1 | tee "$OUT/bench_e2e.log" | tail -12 ;;
    profile)  # where a graph-replayed step's GPU time goes: 1 and 32 rows at the T2I prefix
      for rows in 1 32; do
        timeout 150 python3 benchmarks/profile_step.py --graph --rows "$rows" 2>&1 | tee "$OUT/profile_r$rows.log" | tail -1
      done ;;
    quant)  # 8-bit weights: backbone step and DiT forward against bf16 in the same run
      timeout 420 python3 benchmarks/bench_quant.py ${QUANT_ARGS:-} 2>&1 | tee "$OUT/bench_quant.log" | tail -16 ;;
    tiers)  # memory tiers: T2I 1024 and understanding 800 (TIERS_QUANT: fp8 none; TIERS: 80 24 16), one
      # process per tier: an arena view that outlives its pipeline would keep the arena allocated
      for q in ${TIERS_QUANT:-fp8 none}; do for t in ${TIERS:-80 24 16}; do
        timeout ${TIERS_TIMEOUT:-200} python3 benchmarks/bench_tiers.py --quant $q --memory $t \
            --max-seconds $(( ${TIERS_TIMEOUT:-200} - 60 )) 2>&1 | tee "$OUT/bench_tiers_${q}_$t.log" | tail -1
      done; done ;;
    backbone)
      timeout 300 python3 benchmarks/bench_backbone.py --no-clear --batches ${BATCHES:-1,4,16,32} 2>&1 | tee "$OUT/bench_backbone.log" | tail -12 ;;
  esac
done
