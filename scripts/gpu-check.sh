#!/usr/bin/env bash
# GPU check, under 5 minutes on a machine with an NVIDIA GPU: builds with CUDA, runs the detector
# fidelity tests on CUDA against the same ultralytics goldens as on CPU, and times the forward pass
# on CUDA against CPU on the same weights.
# Status: prepared on a machine without a GPU; not yet run on one (see the issue notes).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
scripts/build-cuda.sh
root=$PWD/target/cuda-root
export LD_LIBRARY_PATH=$root/lib64:${LD_LIBRARY_PATH:-}
export PATH=$root/bin:$PATH CUDA_ROOT=$root
export CARGO_TARGET_DIR=$PWD/target/cuda
if ! command -v nvidia-smi >/dev/null 2>&1; then export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}; fi
IDAICS_TEST_DEVICE=cuda:0 cargo test --release --features cuda --test detector_golden --test detector_predict
weights=tests/fixtures/shapes/shapes-yolov8n-seg.safetensors
for device in cpu cuda:0; do
  echo "$device: $(IDAICS_BENCH_DEVICE=$device "$CARGO_TARGET_DIR/release/examples/bench_detector" "$weights" 512 20)"
done
