#!/usr/bin/env bash
# One prepared run for a GPU machine that has its own torch, Triton and nvcc but
# no package registry (issue 6): build fastkd from source against that torch,
# run the whole suite with the GPU tests enabled, run the CUDA kernel tests under
# compute-sanitizer (memcheck, racecheck) where it exists, verify every backend against
# the reference, benchmark every GPU backend and peer, draw the charts.
#   bash benchmarks/gpu_check.sh OUTDIR        (OUTDIR gets logs, CSV and PNGs)
# Each step's log is kept even when a step fails; the exit status is that of the
# first failing step. QUICK=1 runs the quick benchmark (also what a CPU dry run uses).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: run with a log in $out/NAME.log
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 5 "$out/$name.log"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$out/device.txt" 2>&1
cat "$out/device.txt"
# MAX_JOBS: the device machine has more cores than the dev machines
# FASTKD_BUILD_CUDA=1: the CUDA kernels or a failed build (never a quiet CPU-only one)
step build env MAX_JOBS=${MAX_JOBS:-16} FASTKD_BUILD_CUDA=1 FASTKD_CUDA_ARCHS=${FASTKD_CUDA_ARCHS:-9.0} \
  "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
step tests env FASTKD_GPU_TESTS=1 FASTKD_REQUIRE_EXTENSION=1 "$PYTHON" -m pytest -q -rs -x --durations=15
# The CUDA kernel tests under compute-sanitizer, when the machine has it: memcheck
# (out-of-bounds and misaligned accesses; PyTorch's caching allocator off so that
# every tensor is its own allocation and a read past its end is caught) and racecheck
# (shared-memory hazards of the block reductions). Any report fails the step: the
# tool's exit status (--error-exitcode) or a non-zero summary in its log.
sanitize() {  # sanitize TOOL: one step, log $out/sanitizer-TOOL.log
  local tool=$1
  step "sanitizer-$tool" env FASTKD_GPU_TESTS=1 FASTKD_REQUIRE_EXTENSION=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda_kernels.py -k "${SANITIZER_TESTS:-37x100 or 16x12305 or stream or mgd and float32}"
  if grep -Eq "(ERROR|RACECHECK) SUMMARY: [1-9]" "$out/sanitizer-$tool.log"; then
    echo "== sanitizer-$tool: reports in $out/sanitizer-$tool.log"
    [[ $status -eq 0 ]] && status=1
  fi
}
if command -v compute-sanitizer > /dev/null; then
  sanitize memcheck
  sanitize racecheck
else
  echo "== sanitizer: compute-sanitizer not on PATH, skipped" | tee "$out/sanitizer.log"
fi
step verify "$PYTHON" -m fastkd.verify
device=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
bench_args=(--device "$device" --csv "$out/$device.csv")
[[ ${QUICK:-0} == 1 ]] && bench_args+=(--quick)
step bench "$PYTHON" -m fastkd.bench "${bench_args[@]}"
step plot "$PYTHON" benchmarks/plot.py "$out/$device.csv" "$out"
exit $status
