#!/usr/bin/env bash
# The GPU checks in one device call: the GPU-relevant tests with compiled kernels, then the
# benchmarks, each stage under its own time limit so one slow stage cannot eat the others.
#
# Here, once:   ./scripts/gpu_wheels.sh            (wheels the GPU image lacks, into .whl/)
# Device call:  run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=...)
#
# STAGES picks stages (default: all, in this order); results land in $OUT (the device tool
# brings back at most 8 files), to be committed under benchmarks/results/. The benchmark
# scripts write their JSON after every row, so a stage stopped by its limit keeps what it
# measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
STAGES=${STAGES:-"tests attention input inference train"}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
log="$OUT/session.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc
  python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib',
jaxlib.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$log"

stage() {  # stage SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return ;; esac
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 30
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

# The tests that exercise the kernels, the attention and the model (the float64 parity
# fixtures included) with compiled Triton kernels: several workers sharing the GPU, so no
# process may take most of its memory up front. -x -v: a failure is named (and its traceback
# printed) even when the stage's time limit stops the rest.
XLA_PYTHON_CLIENT_PREALLOCATE=false stage 90 tests python3 -m pytest -x -v -p no:cacheprovider \
    -n 6 --timeout 85 --tb=short --durations 12 \
    tests/test_pallas_gather.py tests/test_attention.py tests/test_model.py \
    tests/test_parity.py tests/test_reference_memory.py tests/test_inference.py
# The block-0 layer at K = 914: gathers (XLA, Pallas) against the tiled window products.
stage 35 attention python3 scripts/bench_attention.py --ks 914 --impls xla,pallas,tiled \
    --repeats 5 --output "$OUT/attention_initial_gpu.json"
# The input pipeline against worker processes on this host's cores.
stage 75 input python3 scripts/bench_input.py --workers 1,2,4,8,16 --seconds 2 \
    --time-limit 70 --output "$OUT/input_gpu_host.json"
# Compiling IET takes minutes: one case per model family, the lighter first.
stage 90 inference python3 scripts/bench_inference.py --models iet_light_x4 --dtypes float32 \
    --repeats 3 --output "$OUT/inference_gpu.json"
stage 120 train python3 scripts/bench_train.py --cases iet_light_x4:64:16 --dtypes bfloat16 \
    --remat off --repeats 3 --output "$OUT/train_step_gpu.json"
echo "== done after ${SECONDS}s" | tee -a "$log"
