#!/usr/bin/env bash
# One device call: install carried wheels (peft, bitsandbytes) and the project, run the GPU tests,
# then the benchmarks named as arguments (default: kernels). Logs go to $OUT when it is set.
#   bash benchmarks/gpu_run.sh [tests] [kernels] [merge] [optim] ...
set -uo pipefail
OUT=${OUT:-/tmp/lora-engine-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for job in "${@:-kernels}"; do
  case "$job" in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    kernels) LORA_ENGINE_AUTOTUNE=1 python3 benchmarks/bench_kernels.py --out "$OUT/bench_kernels.jsonl" \
               2>&1 | tee "$OUT/bench_kernels.log" | grep -v '^{' ;;
    kernels-quick) python3 benchmarks/bench_kernels.py --quick 2>&1 | tee "$OUT/bench_kernels_quick.log" ;;
    *.py) python3 "$job" 2>&1 | tee "$OUT/$(basename "$job" .py).log" ;;
    *) python3 "benchmarks/bench_$job.py" 2>&1 | tee "$OUT/bench_$job.log" ;;
  esac
done
