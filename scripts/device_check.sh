#!/usr/bin/env bash
# The GPU checks of issue 6 as one command for a lent GPU machine (the device tool), from the
# repository root there. Prepare here first with `bash scripts/device_wheels.sh`, then
#   run(command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=570)
# In order, each under its own time limit (and all within BUDGET) so that one stuck part cannot eat the lease:
#   1. tests/test_cuda.py and the CUDA view-replay test (correctness: the cache on CUDA, the training
#      step under bf16, no host sync inside a step, the distill stage on CUDA);  about 1-2 min
#   2. bench.distill_throughput on the default profile's student (student_cnn, Fashion-MNIST shape);  <1 min
#   3. ResNet-18 student from a 4-teacher cache (gpu profile), eager with --breakdown;   ~1-2 min
#   4. the same with the student torch.compile'd (the gpu profile's setting);          ~2-3 min
#   5. the official 5-teacher zoo: cached against online MEAL;                          ~1-2 min
#   6. torchrun (issue 19): the 2-GPU NCCL twins of tests/test_distributed.py (tests/test_cuda.py; they
#      need two GPUs and are skipped, with the reason in dist.txt, on one);              ~1 min
# Everything lands in $OUT (the tool brings it back): env.txt, tests.txt, bench.txt and one JSON per
# benchmark, to be copied into bench/results/ and committed.
# A dry run on a machine without a GPU (the flow, not the figures):
#   DEVICE=cpu BENCH_ARGS="--samples 32 --rounds 2 --warmup 1 --teachers 2" bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:-}
BUDGET=${BUDGET:-540}  # seconds for the whole script: keep the device call's timeout_s above it
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
start=$SECONDS
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, numpy, zarr; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'zarr', zarr.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee "$OUT/env.txt"

timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py \
  tests/test_views.py::test_replay_is_the_same_on_cuda 2>&1 | tee "$OUT/tests.txt"
echo "tests done at $((SECONDS - start)) s" | tee -a "$OUT/tests.txt"

bench() {  # name, time limit (s), params file, extra arguments; skipped when under a minute of BUDGET is left
  local name=$1 limit=$2 params=$3 left=$((BUDGET - (SECONDS - start)))
  shift 3
  if (( left < 60 )); then
    echo "== $name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/bench.txt"
    return
  fi
  (( limit > left )) && limit=$left
  local cmd="python3 -m bench.distill_throughput --params $params --device $DEVICE $* $BENCH_ARGS"
  echo "== $name: $cmd" | tee -a "$OUT/bench.txt"
  # shellcheck disable=SC2086  # BENCH_ARGS: several words on purpose
  timeout "$limit" python3 -m bench.distill_throughput --params "$params" --device "$DEVICE" \
    --out "$OUT/$DEVICE-distill_throughput-$name.json" "$@" $BENCH_ARGS 2>&1 | tee -a "$OUT/bench.txt"
  echo "== $name done at $((SECONDS - start)) s" | tee -a "$OUT/bench.txt"
}
bench default 120 params.yaml
bench 4teachers-eager 180 profiles/gpu.yaml --teachers 4 --no-compile --breakdown
bench 4teachers-compiled 240 profiles/gpu.yaml --teachers 4 --compile
bench 5teachers-eager 150 profiles/gpu.yaml --no-compile

# 6. torchrun: the NCCL twins of tests/test_distributed.py (skipped, and said so, on a one-GPU machine)
left=$((BUDGET - (SECONDS - start)))
if (( left >= 60 )); then
  {
    echo "== GPUs: $(python3 -c 'import torch; print(torch.cuda.device_count())')"
    timeout $(( left < 180 ? left : 180 )) python3 -m pytest -q -p no:cacheprovider -rs \
      "tests/test_cuda.py::test_two_gpus_under_torchrun_match_one_gpu"
  } 2>&1 | tee "$OUT/dist.txt"
else
  echo "== torchrun checks skipped: ${left}s of the ${BUDGET}s budget left" | tee "$OUT/dist.txt"
fi
