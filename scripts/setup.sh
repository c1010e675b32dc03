#!/usr/bin/env bash
# Sets up a working titans_ext checkout: a .venv with pinned torch, then an in-place build.
#
#   bash scripts/setup.sh                      # .venv + build (what the README and CI use)
#   TITANS_TORCH=cpu bash scripts/setup.sh     # torch 2.13.0 CPU build (1 GB; no CUDA compile)
#   TITANS_TORCH=cuda bash scripts/setup.sh    # torch 2.14.1 CUDA build (5.5 GB; compiles the CUDA kernels)
#   TITANS_SYSTEM_TORCH=1 bash scripts/setup.sh   # no venv, no pip: build against the current python's
#                                                 # torch (the GPU machine, offline)
# Default: the CUDA build of torch when nvcc is present (so the CUDA kernels are compiled and
# checked even on a machine without a GPU), else the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

if [[ "${TITANS_SYSTEM_TORCH:-0}" == 1 ]]; then
  PY="${PYTHON:-python3}"
  "$PY" setup.py build_ext --inplace
  "$PY" -c "import titans_ext; print('titans_ext built against torch', titans_ext.torch.__version__)"
  exit 0
fi

variant="${TITANS_TORCH:-auto}"
if [[ "$variant" == auto ]]; then
  if command -v nvcc >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
fi
case "$variant" in
  cuda) torch_pin="torch==2.14.1" ;;
  cpu) torch_pin="torch==2.13.0" ;;
  *) echo "TITANS_TORCH must be cpu, cuda or auto, got '$variant'" >&2; exit 2 ;;
esac

[[ -x .venv/bin/python ]] || python3 -m venv .venv
# The local pip configuration may point at extra wheel folders that do not exist; its warnings are noise.
.venv/bin/pip install -q --disable-pip-version-check "$torch_pin" numpy ninja pytest "setuptools>=64" wheel \
  tqdm matplotlib 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import torch" || { echo "torch did not install" >&2; exit 1; }
# --no-build-isolation: build against the torch just installed, not a second one in a build env.
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import titans_ext, torch; print('titans_ext', titans_ext.__version__, 'built against torch', torch.__version__)"
