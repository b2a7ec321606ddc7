#!/usr/bin/env bash
# The prepared GPU session: GPU tests, kernel benchmarks and method benchmarks on one CUDA machine.
#
#   bash benchmarks/gpu_session.sh OUTDIR [METHOD_SECONDS]
#
# Runs from the repository root with only torch + Triton + the project's pure-Python needs (pydantic may
# come from wheels put on PYTHONPATH by the caller). Each stage has its own time limit and a failing stage
# does not stop the next; everything lands in OUTDIR (at most 8 files):
#   session.log         what ran, versions, each stage's exit status
#   gpu-tests.log       pytest -m gpu (Triton conv + routed kernels on the GPU)
#   conv-cuda.json/.svg benchmarks.bench_conv, fp16 channels_last, eager and CUDA-graph timings
#   routing-cuda.json   benchmarks.bench_routing, fp16
#   methods.tgz         catalog/results/<id>/cuda-*.json of `catalog bench --all --device cuda`
# Copy the JSONs to catalog/results/kernels/ and unpack methods.tgz into catalog/results/ to commit them.
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR [METHOD_SECONDS]}
METHOD_S=${2:-240}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the results are packed from inside OUT/results
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/session.log"
exec 3>&1  # the caller's stdout: stage lines go there and to the log, whatever a stage redirects
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log the exit status
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG" >&3
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - start))s" | tee -a "$LOG" >&3
}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name(), 'commit', __import__('os').environ.get('DYNNET_COMMIT'))" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

stage gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  tests/test_kernels_conv_gpu.py tests/test_kernels_routed_gpu.py > "$OUT/gpu-tests.log" 2>&1
tail -5 "$OUT/gpu-tests.log" | tee -a "$LOG"

stage bench-conv 150 python3 -m benchmarks.bench_conv --device cuda --dtype float16 --channels-last \
  --repeats 20 --min-time 0.02 --out "$OUT/conv-cuda.json" --svg "$OUT/conv-cuda.svg" 2>&1 | tail -60 >> "$LOG"

stage bench-routing 90 python3 -m benchmarks.bench_routing --device cuda --dtype float16 --quick \
  --out "$OUT/routing-cuda.json" 2>&1 | tail -40 >> "$LOG"

# Fixed Triton tiles for the methods (DYNNET_TRITON_AUTOTUNE=0): autotuning every distinct layer shape
# of 24 networks would spend the session's minutes tuning instead of measuring. --in-process: one CUDA
# context for all entries (a fresh process per entry would spend seconds of the budget on each start).
stage methods "$METHOD_S" env DYNNET_TRITON_AUTOTUNE=0 python3 -m catalog bench --all --in-process --device cuda \
  --batch-sizes 1 8 --min-time 0.3 \
  --results-dir "$OUT/results" 2>&1 | tail -40 >> "$LOG"
(cd "$OUT/results" 2>/dev/null && tar czf "$OUT/methods.tgz" . && cd .. && rm -rf "$OUT/results")
echo "== done" | tee -a "$LOG"
