#!/usr/bin/env bash
# GPU check, on a machine with an NVIDIA GPU and the CUDA 13 libraries (the device machines' image
# has them in its Python environment) but no Rust: runs the binaries scripts/build-cuda.sh packed in
# target/cuda/gpu-check.tar.xz (carry that file). Under a minute:
#  1. the raw-output goldens (n and s) and the shapes-model predict goldens, on cuda:0;
#  2. the forward pass of the shapes model at 512x512 on CPU and on cuda:0, same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/cuda/gpu-check
[ -d "$bin" ] || tar -C target/cuda -xJf target/cuda/gpu-check.tar.xz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The CUDA libraries of the image's Python packages (nvidia-cublas, nvidia-curand, ...).
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
export IDAICS_REPO_ROOT=$PWD IDAICS_BIN=$PWD/$bin/idaics IDAICS_TEST_DEVICE=cuda:0
"$bin/detector_golden" --test-threads 1
"$bin/detector_predict" --test-threads 1 detect_matches_ultralytics_predict
weights=tests/fixtures/shapes/shapes-yolov8n-seg.safetensors
for device in cpu cuda:0; do
  echo "$device: $(IDAICS_BENCH_DEVICE=$device "$bin/bench_detector" "$weights" 512 20)"
done
