#!/usr/bin/env bash
# One prepared run for a lent GPU (issue 6): at most 570 s of step limits, usually far less:
#   1. installs the carried peer wheels from .whl/ (bench/fetch_gpu_wheels.sh, run beforehand here);
#   2. builds titans_ext in place against the machine's torch, CUDA kernels for sm_90a;
#   3. the CUDA tests (CI runs the emulated ones), host-sync checks included;
#   4. compute-sanitizer memcheck and racecheck on small forward + backward cases, synccheck and
#      initcheck on the six-chunk bf16 ones (Dk = 128; chunk groups of two) (bench/gpu_sanitize_case.py);
#   5. the kernel-by-kernel profile (bench/gpu_profile.py);
#   6. the benchmark (bench/gpu.py): fwd+bwd against fla, titans-pytorch and SDPA.
# Logs and results go to $OUT (the device tool's output folder; bench/results/gpu_check otherwise).
# A short summary is printed last. Device tool call (from the checkout's root):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
SUMMARY=()
start_all=$SECONDS

# step NAME LIMIT_S CMD...: runs CMD under timeout, logs to $OUT/NAME.log, records its exit code.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  return "$rc"
}

# Machine, wheels and build share one log: $OUT brings back at most 8 files.
setup() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || return 1
  fi
  TITANS_SYSTEM_TORCH=1 TITANS_EXT_CUDA=1 TITANS_EXT_CUDA_ARCHS=9.0a MAX_JOBS=16 PYTHON="$PY" bash scripts/setup.sh
}
export -f setup
export PY
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ! step build 150 bash -c setup; then
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
step tests_cuda 110 "$PY" -m pytest -q -p no:cacheprovider -rs python_tests/test_linear_memory_cuda.py \
  python_tests/test_host_syncs_cuda.py
# memcheck and racecheck on every case; synccheck (barrier misuse) and initcheck (reads of
# memory never written) on the six-chunk bf16 cases, whose pipelines refill buffers and whose
# backward reads the scan's group cotangents.
sanitize() {
  local rc=0 tool cases
  for tool in memcheck racecheck synccheck initcheck; do
    cases=""
    [[ $tool == synccheck || $tool == initcheck ]] && cases="long_bf16 bf16_groups"
    echo "--- compute-sanitizer --tool $tool ${cases:-(every case)}"
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m bench.gpu_sanitize_case $cases || rc=1
  done
  return $rc
}
export -f sanitize
step sanitizer 120 bash -c sanitize
step profile 40 "$PY" -m bench.gpu_profile --out "$OUT/profile.md"
step bench 150 "$PY" -m bench.gpu --out "$OUT/gpu.md"

echo
echo "=== summary ($((SECONDS - start_all)) s; logs in $OUT)"
head -n 3 "$OUT/build.log"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "passed|failed|error" "$OUT"/tests_*.log | tail -n 4
grep -hE "^--- compute-sanitizer|ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log"
[[ -f "$OUT/profile.md" ]] && cat "$OUT/profile.md"
[[ -f "$OUT/gpu.md" ]] && cat "$OUT/gpu.md"
