#!/usr/bin/env bash
# Type-checks the `cuda` feature (candle's CUDA backend and every `--features cuda` path
# of dnd) on a machine without a GPU: nvcc and the CUDA headers come from NVIDIA's wheels
# on PyPI, candle-kernels' build script compiles its PTX with them, and `cargo check`
# type-checks our crates against candle's CUDA API. Linking a CUDA binary would also need
# the driver library (libcuda.so), which no wheel ships; bench/gpu_check.sh builds and
# runs one on a machine with a GPU.
#   .ci/check_cuda.sh            (from the repository root; CARGO_TARGET_DIR is honoured)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DND_TOOLS_DIR:-$HOME/.cache/dnd-tools}/cuda-venv"
if [ ! -x "$venv/bin/nvcc-ready" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r .ci/requirements-cuda.txt
  touch "$venv/bin/nvcc-ready" && chmod +x "$venv/bin/nvcc-ready"
fi
cuda="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
[ -x "$cuda/bin/nvcc" ] || { echo "no nvcc under $cuda after pip install" >&2; exit 1; }
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
# No GPU to ask: compile the kernels for Hopper (H100/H200); cudarc cannot parse the
# wheel's 13.5 and needs the major version spelled out.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
nvcc --version | tail -1
cargo check -p dnd-cli --features cuda --all-targets
