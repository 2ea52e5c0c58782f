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
STAGES=${STAGES:-"tests attention train inference"}
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
# process may take most of its memory up front.
XLA_PYTHON_CLIENT_PREALLOCATE=false stage 120 tests python3 -m pytest -q -p no:cacheprovider \
    -n 6 --timeout 110 -rfE --durations 12 --junitxml "$OUT/tests.xml" \
    tests/test_pallas_gather.py tests/test_attention.py tests/test_model.py \
    tests/test_parity.py tests/test_reference_memory.py tests/test_inference.py
stage 60 attention python3 scripts/bench_attention.py --ks 914,225,64 --impls xla,pallas \
    --repeats 5 --output "$OUT/attention_gpu.json"
stage 90 train python3 scripts/bench_train.py --cases iet_light_x4:64:16,iet_x4:64:8 \
    --dtypes bfloat16,float32 --remat off --repeats 5 --output "$OUT/train_step_gpu.json"
stage 50 inference python3 scripts/bench_inference.py --dtypes float32,bfloat16 --repeats 3 \
    --output "$OUT/inference_gpu.json"
echo "== done after ${SECONDS}s" | tee -a "$log"
