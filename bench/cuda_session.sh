#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks in one script, for a lent GPU machine whose python3 already has
# a CUDA torch (the missing pure-Python packages travel as wheels in .whl/). Writes its logs and
# JSON results to $OUT; each step has its own time limit so that one hang does not eat the rest.
#   OUT=/tmp/out bash bench/cuda_session.sh [step ...]     (default: every step, in order)
set -u
OUT=${OUT:-/tmp/cuda-session}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DDPM_CACHE_DIR=/tmp/ddpm-cache
step() { local limit=$1 name=$2; shift 2; echo "== $(date +%T) $name"; local t=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?; tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc, $((SECONDS - t)) s"; }
STEPS=" $* "
want() { [ "$STEPS" = "  " ] || [[ "$STEPS" == *" $1 "* ]]; }
want machine && step 30 machine bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -E '^Model name|^CPU\(s\)'; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())'"
want cuda_tests && step 240 cuda_tests $PY -m pytest -q -p no:cacheprovider -o addopts= tests/library/test_cuda.py
want bench_cifar10_bf16 && step 120 bench_cifar10_bf16 $PY bench/bench_train.py --device cuda --precision bf16 --only cifar10 --batch 128 --seconds 6 --json "$OUT/results_train_cuda.jsonl"
want bench_cifar10_fp32 && step 120 bench_cifar10_fp32 $PY bench/bench_train.py --device cuda --precision fp32 --only cifar10 --batch 128 --seconds 6 --json "$OUT/results_train_cuda.jsonl"
want bench_small_bf16 && step 120 bench_small_bf16 $PY bench/bench_train.py --device cuda --precision bf16 --only small --batch 256 --seconds 6 --json "$OUT/results_train_cuda.jsonl"
if want cuda_job; then
  step 240 cuda_job $PY bench/bench_cuda_job.py --minutes "${JOB_MINUTES:-1.5}" --batch 128 --work /tmp/cuda-job
  cp /tmp/cuda-job/samples.png "$OUT/cuda_job_samples.png" 2>/dev/null
fi
want bench_cifar10_bf16_compile && step 150 bench_cifar10_bf16_compile $PY bench/bench_train.py --device cuda --precision bf16 --only cifar10 --batch 128 --compile --seconds 6 --json "$OUT/results_train_cuda.jsonl"
exit 0
