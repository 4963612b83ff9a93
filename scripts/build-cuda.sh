#!/usr/bin/env bash
# Builds idaics with --features cuda using the CUDA toolkit from PyPI wheels (no system toolkit):
# nvcc for candle's kernels, and the cuBLAS, cuRAND, NVRTC and runtime libraries cudarc links.
#   scripts/build-cuda.sh            -> target/release/idaics with CUDA
# Needs: python3 with pip, network access to PyPI (or the wheels in a local pip cache), and on the
# machine that runs it, an NVIDIA driver (libcuda.so.1).
# Status: prepared on a machine without a GPU; not yet run on one (see the issue notes).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CUDA_VENV:-$PWD/target/cuda-venv}
cuda_major=${CUDA_MAJOR:-12}
if [ ! -x "$venv/bin/nvcc-root" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q \
    "nvidia-cuda-nvcc-cu${cuda_major}" "nvidia-cuda-runtime-cu${cuda_major}" "nvidia-cublas-cu${cuda_major}" \
    "nvidia-curand-cu${cuda_major}" "nvidia-cuda-nvrtc-cu${cuda_major}"
  touch "$venv/bin/nvcc-root"
fi
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
# Merge the wheels into one toolkit-shaped tree: bin/nvcc, include/, lib64/.
root=$PWD/target/cuda-root
rm -rf "$root"; mkdir -p "$root/bin" "$root/include" "$root/lib64"
for pkg in "$site"/nvidia/*/; do
  [ -d "$pkg/bin" ] && cp -rs "$pkg/bin/." "$root/bin/" 2>/dev/null || true
  [ -d "$pkg/include" ] && cp -rs "$pkg/include/." "$root/include/" 2>/dev/null || true
  [ -d "$pkg/lib" ] && cp -rs "$pkg/lib/." "$root/lib64/" 2>/dev/null || true
  [ -d "$pkg/nvvm" ] && ln -sfn "$pkg/nvvm" "$root/nvvm"
done
# Unversioned names for the linker.
for lib in "$root"/lib64/lib*.so.*; do
  base=${lib%%.so.*}.so
  [ -e "$base" ] || ln -s "$lib" "$base"
done
if ! ls /usr/lib/x86_64-linux-gnu/libcuda.so* >/dev/null 2>&1 && [ -d "$root/lib64/stubs" ]; then
  export LIBRARY_PATH="$root/lib64/stubs:${LIBRARY_PATH:-}"
fi
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_TOOLKIT_ROOT_DIR=$root
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib64:${LIBRARY_PATH:-}
export LD_LIBRARY_PATH=$root/lib64:${LD_LIBRARY_PATH:-}
# Without a GPU here (a build-only machine), candle's kernels need the target compute capability.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
fi
nvcc --version | tail -n 1
# A target directory of its own, so the CPU build stays as it is.
export CARGO_TARGET_DIR=$PWD/target/cuda
cargo build --release --features cuda --bin idaics --example bench_detector
echo "built $CARGO_TARGET_DIR/release/idaics with CUDA; run with LD_LIBRARY_PATH=$root/lib64"
