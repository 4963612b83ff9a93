#!/usr/bin/env bash
# GPU check, on a machine with an NVIDIA GPU and the CUDA 13 libraries (the device machines' image
# has them in its Python environment) but no Rust: runs the binaries scripts/build-cuda.sh packed in
# target/cuda/gpu-check.tar.xz (carry that file). Under a minute:
#  1. the raw-output goldens (n and s) and the shapes-model predict goldens, on cuda:0;
#  2. the forward pass of the shapes model at 512x512 on CPU and on cuda:0, same weights, per
#     image and per series (a batch of seven views), beside PyTorch's on the GPU where it is installed.
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
# Per image (batch 1) and per series (its seven views in one batch), candle on both devices and,
# where the image's Python has torch and ultralytics, PyTorch on the same GPU and weights.
torch_side=0
python3 -c "import torch, ultralytics; assert torch.cuda.is_available()" 2>/dev/null && torch_side=1
for batch in 1 7; do
  for device in cpu cuda:0; do
    echo "candle $device, batch $batch: $(IDAICS_BENCH_BATCH=$batch IDAICS_BENCH_DEVICE=$device "$bin/bench_detector" "$weights" 512 20)"
  done
  if [ "$torch_side" = 1 ]; then
    echo "pytorch cuda:0, batch $batch: $(python3 bench/torch_forward.py "$weights" 512 4 20 "$batch" cuda:0 2>/dev/null | tail -n 1)"
  else
    echo "pytorch cuda:0, batch $batch: not run (this Python has no torch with CUDA and ultralytics)"
  fi
done
