#!/usr/bin/env bash
# Downloads, here (with network), the peers that bench/gpu.py compares against and that the GPU
# machine lacks, as pure-Python wheels for its Python 3.12, into .whl/ (git-ignored). The device
# image already has torch, triton, einops, numpy, sympy, cloudpickle, packaging, tqdm and ninja
# (/work/.library/device/KINDS.md), so only these travel (about 2.5 MB). One version per package:
# two versions of one package stop the install there.
#
#   bash bench/fetch_gpu_wheels.sh        # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PACKAGES=(
  fla-core==0.6.0                    # flash-linear-attention: chunk_ttt_linear, chunk_gated_delta_rule
  titans-pytorch==0.5.5              # NeuralMemory
  assoc-scan==0.0.6 accelerated-scan==0.3.1 axial-positional-embedding==0.3.12 einx==0.4.3 frozendict==2.5.1
  hyper-connections==0.4.11 torch-einops-utils==0.2.0 rotary-embedding-torch==0.9.1 tensordict==0.15.3
  pyvers==0.2.3 x-transformers==2.31.10 loguru==0.7.3
)
mkdir -p .whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
ls .whl
du -sh .whl
