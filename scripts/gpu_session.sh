#!/usr/bin/env bash
# Issue #7 in one device call: the GPU-relevant tests un-interpreted, then every benchmark.
#
# Here, once:   ./scripts/gpu_wheels.sh            (wheels the GPU image lacks, into .whl/)
# Device call:  run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# Each stage has its own time limit so one slow stage cannot eat the others; results land in
# $OUT (the device tool brings them back), to be committed under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
log="$OUT/session.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax; print(jax.__version__, jax.devices())"
} 2>&1 | tee "$log"

stage() {  # stage SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 40
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

# Compiled Triton kernels vs the XLA reference, and the model with gather_impl="auto" (= pallas).
stage 150 tests python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_pallas_gather.py tests/test_attention.py tests/test_model.py
stage 120 attention python3 scripts/bench_attention.py --repeats 5 --output "$OUT/attention_gpu.json"
stage 150 train python3 scripts/bench_train.py --repeats 5 --output "$OUT/train_step_gpu.json"
stage 100 inference python3 scripts/bench_inference.py --repeats 3 --output "$OUT/inference_gpu.json"
