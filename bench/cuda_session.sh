#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks in one script, for a lent GPU machine whose python3 already has
# a CUDA torch. Writes logs and JSON results to $OUT; each step has its own time limit so that one
# hang does not eat the rest. Results: $OUT/results_cuda.jsonl, one line per result, to append to
# bench/results_cuda.jsonl.
#
#   OUT=/tmp/out bash bench/cuda_session.sh [step ...]     (default: every step, in order)
#   bash bench/cuda_session.sh --stage DIR                 install the wheels in DIR into .gpu-site
#
# The project's stack (Ray, Prefect, MLflow, DVC, diffusers) is not on the GPU image and is larger
# than one device call carries (64 MiB), so it travels in parts (bench/gpu_wheels.py makes
# .whl/part1..N here); each call installs one part into .gpu-site, an ignored folder that stays on
# the warm machine between calls, and the last call then runs this script:
#   call k < N: carry [".whl/partk"], command: bash bench/cuda_session.sh --stage .whl/partk
#   call N:     carry [".whl/partN"], command: bash bench/cuda_session.sh --stage .whl/partN && bash bench/cuda_session.sh
set -u
PY=${PYTHON:-python3}
SITE=$PWD/.gpu-site
if [ "${1:-}" = "--stage" ]; then      # wheels, and pieces NAME.whl.K-of-N of one too large to carry
  mkdir -p "$SITE" .gpu-pieces
  cp "$2"/*-of-* .gpu-pieces/ 2>/dev/null
  for first in .gpu-pieces/*.1-of-*; do
    [ -e "$first" ] || continue
    whl=${first%.1-of-*}; n=${first##*-of-}
    [ "$(ls "$whl".*-of-"$n" | wc -l)" = "$n" ] || continue
    for k in $(seq 1 "$n"); do cat "$whl.$k-of-$n"; done >"$whl" && rm "$whl".*-of-"$n"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$whl" && rm "$whl"
  done
  ls "$2"/*.whl >/dev/null 2>&1 &&
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$2"/*.whl
  echo "staged $2 into $SITE ($(ls "$SITE" | wc -l) entries; pieces waiting: $(ls .gpu-pieces | wc -l))"; exit
fi
OUT=${OUT:-/tmp/cuda-session}; mkdir -p "$OUT"
RESULTS=$OUT/results_cuda.jsonl
[ -d "$SITE" ] && export PYTHONPATH=$SITE
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DDPM_CACHE_DIR=/tmp/ddpm-cache
export PATH=$SITE/bin:$PATH MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 RAY_USAGE_STATS_ENABLED=0
step() { local limit=$1 name=$2; shift 2; echo "== $(date +%T) $name"; local t=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?; tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc, $((SECONDS - t)) s"; return $rc; }
STEPS=" $* "
want() { [ "$STEPS" = "  " ] || [[ "$STEPS" == *" $1 "* ]]; }
train() { local name=$1; shift      # ddpm_cifar10 in bf16 against diffusers' UNet2DModel, same run
  step "${LIMIT:-150}" "$name" $PY bench/bench_train.py --device cuda --precision bf16 --only cifar10 \
    --seconds 6 --no-memory --cuda-jsonl "$RESULTS" "$@"; }

want machine && step 30 machine bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -E '^Model name|^CPU\(s\)'; $PY -c 'import torch, ray, prefect, mlflow, dvc; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(), ray.__version__, prefect.__version__, mlflow.__version__)'"
want cuda_tests && step 300 cuda_tests $PY -m pytest -q -p no:cacheprovider -o addopts= tests/library/test_cuda.py
want train_b128 && train train_b128 --batch 128
want train_b256 && train train_b256 --batch 256
want train_b128_foreach && train train_b128_foreach --batch 128 --optimizer foreach
want train_b128_channels_last && train train_b128_channels_last --batch 128 --channels-last
want train_b128_compiled && LIMIT=300 train train_b128_compiled --batch 128 --compile
want train_b256_compiled && LIMIT=300 train train_b256_compiled --batch 256 --compile
if want main_job_ray_gpu; then
  # the README's main job with the defaults, through a local Ray cluster on this GPU machine
  git rev-parse --git-dir >/dev/null 2>&1 || { git init -q && git add -A >/dev/null &&
    git -c user.name=gpu -c user.email=gpu@localhost commit -qm "device copy" >/dev/null; }
  t=$SECONDS
  step 600 main_job_ray_gpu $PY -m flows.pipeline --params params.yaml ${MAIN_JOB_ARGS:-}; rc=$?
  $PY bench/main_job_record.py --what main_job_ray_gpu --seconds $((SECONDS - t)) --rc $rc >>"$RESULTS"
  cp metrics/samples.png "$OUT/main_job_samples.png" 2>/dev/null
  tail -n 1 "$RESULTS"
fi
exit 0
