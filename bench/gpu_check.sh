#!/usr/bin/env bash
# dnd on an NVIDIA GPU, in one script:
#   1. builds dnd and the parity tests with `--features cuda` (or takes binaries built
#      elsewhere: DND_BIN, DND_PARITY_BIN);
#   2. runs the model parity tests with the generator on the GPU (DND_TEST_DEVICE=cuda:0,
#      f16: tolerances 200x the f32 ones; tests/multimodal_parity.rs), which also checks
#      that a generated image does not depend on its batch there;
#   3. times `dnd generate` against diffusers in fp16 at Stable Diffusion v1.5 size
#      (random weights, 512x512, STEPS DDIM steps, guidance 7.5, COUNT images in batches
#      of BATCH; bench/generate_bench.py --device cuda), both sides in one run.
# Prints everything it measured and writes it under OUT (default gpu-check/).
#
#   bench/gpu_check.sh                     (from the repository root)
#   STEPS=50 COUNT=8 BATCH=8 OUT=/tmp/gpu bench/gpu_check.sh
#
# Needs: nvidia-smi and a CUDA toolkit (nvcc, cuBLAS, cuRAND, NVRTC) to build; Python 3
# with torch (CUDA), diffusers, transformers, safetensors for step 3. Machines without a
# Rust toolchain: build on one that has it and the CUDA toolkit (deploy/docker/
# Dockerfile.cuda's build stage does), then pass DND_BIN=path/to/dnd and
# DND_PARITY_BIN=path/to/multimodal_parity-<hash> (from `cargo test --release -p dnd-tests
# --test multimodal_parity --features dnd-models/cuda --no-run`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
steps="${STEPS:-20}"
count="${COUNT:-8}"
batch="${BATCH:-8}"
python="${PYTHON:-python3}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1

echo "== the GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
command -v nvcc >/dev/null && nvcc --version | tail -1

if [ -z "${DND_BIN:-}" ]; then
  echo "== building dnd and the parity tests with --features cuda"
  cargo build --release -p dnd-cli --features cuda
  DND_BIN="${CARGO_TARGET_DIR:-target}/release/dnd"
  DND_PARITY_BIN=$(cargo test --release -p dnd-tests --test multimodal_parity \
    --features dnd-models/cuda --no-run --message-format=json 2>/dev/null |
    "$python" -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "multimodal_parity":
        print(m["executable"])')
fi
echo "dnd: $DND_BIN"

echo "== model parity on the GPU (f16)"
if [ -n "${DND_PARITY_BIN:-}" ]; then
  DND_TEST_DEVICE=cuda:0 "$DND_PARITY_BIN" stable_diffusion --test-threads 1
else
  echo "no DND_PARITY_BIN: parity tests skipped"
fi

echo "== dnd generate vs diffusers, fp16, SD v1.5 size, ${steps} steps, ${count} images in batches of ${batch}"
"$python" bench/generate_bench.py --dnd "$DND_BIN" --sd15 --device cuda --size 512 \
  --steps "$steps" --count "$count" --batch-size "$batch" --repeats 3 \
  --workdir "$out/work" --json "$out/generate.json"
echo "== done: $out/gpu_check.log, $out/generate.json"
