#!/usr/bin/env bash
# One GPU-machine call: install the carried wheels, run the GPU tests, then the named benchmarks,
# each under its own time limit, every log under $OUT. Usage (from the repository root, on the GPU
# machine, with .whl carried):  bash benchmarks/gpu_session.sh [tests] [load] [sprint] [backbone]
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
      timeout 300 python3 -m pytest -q -m gpu tests/test_runtime.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
      timeout 200 python3 -m pytest -q -x tests/test_parity.py tests/test_sprint.py tests/test_sampling.py \
          2>&1 | tee "$OUT/cpu_tests_on_gpu_box.log" | tail -3 ;;
    load)
      timeout 300 python3 benchmarks/load_test.py --full --device cuda --task t2i --size 512x512 --steps 8 \
          --clients 1,16 --requests 16 --max-queue 64 2>&1 | tee "$OUT/load_test.log" | tail -8 ;;
    sprint)
      timeout 300 python3 benchmarks/bench_sprint.py --device cuda --full --reps 2 2>&1 \
          | tee "$OUT/bench_sprint.log" | tail -14 ;;
    backbone)
      timeout 300 python3 benchmarks/bench_backbone.py --no-clear 2>&1 | tee "$OUT/bench_backbone.log" | tail -12 ;;
  esac
done
