#!/usr/bin/env bash
# Builds idaics with --features cuda using the CUDA 13 toolkit from PyPI wheels (no system toolkit):
# nvcc and the CCCL headers for candle's kernels, and the runtime, cuBLAS, cuRAND and NVRTC libraries
# cudarc links.
# All of them unpack into one toolkit-shaped tree, site-packages/nvidia/cu13/{bin,include,lib}.
#
#   scripts/build-cuda.sh
#
# leaves target/cuda/release/idaics, and target/cuda/gpu-check.tar.xz (about 20 MB): stripped copies
# of idaics, the detector benchmark and the detector test binaries, for scripts/gpu-check.sh to run
# on a GPU machine that has the CUDA libraries but no Rust toolchain (carry that one file).
# Checked here (no GPU): the build links (against a generated libcuda stub) and the CUDA-built
# binaries pass the detector tests on the CPU. Not yet run on a GPU.
# nvcc is pinned to 13.0, the CUDA version of the GPU machines' driver (580): candle loads its
# kernels as PTX, which a driver older than the compiler refuses.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CUDA_VENV:-$PWD/target/cuda-venv}
cuda=${CUDA_WHEELS_VERSION:-13.0.*}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "nvidia-cuda-nvcc==$cuda" "nvidia-cuda-runtime==$cuda" "nvidia-cuda-nvrtc==$cuda" "nvidia-cuda-cccl==$cuda" \
  "nvidia-nvvm==$cuda" "nvidia-cuda-crt==$cuda" \
  "nvidia-cublas<13.1" "nvidia-curand"
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
root=$site/nvidia/cu13
[ -x "$root/bin/nvcc" ] || { echo "no nvcc in $root/bin" >&2; exit 1; }
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
# Unversioned names for the linker (the wheels ship only libX.so.N).
for lib in "$root"/lib/lib*.so.*; do
  base=${lib%%.so.*}.so
  [ -e "$base" ] || ln -sfn "$(basename "$lib")" "$base"
done
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_TOOLKIT_ROOT_DIR=$root
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib:${LIBRARY_PATH:-}
export LD_LIBRARY_PATH=$root/lib:${LD_LIBRARY_PATH:-}
# Without a GPU here (a build-only machine), candle's kernels need the target compute capability
# (9.0: H100/H200).
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
fi
nvcc --version | tail -n 1
# A target directory of its own, so the CPU build stays as it is.
export CARGO_TARGET_DIR=$PWD/target/cuda
build() { cargo build --release --features cuda --bin idaics --example bench_detector; }
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\b' || [ -e "$root/lib/stubs/libcuda.so" ]; then
  build
else
  # No NVIDIA driver here: link against a stub libcuda.so.1 that defines the driver API symbols
  # cudarc references; the real driver library provides them where the binaries run.
  build 2>/dev/null || true
  rlib=$(ls "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -n 1)
  stubs=$CARGO_TARGET_DIR/libcuda-stub
  mkdir -p "$stubs"
  nm -u "$rlib" 2>/dev/null | awk '$1 == "U" && $2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' | sort -u > "$stubs/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/stub.c"
  export LIBRARY_PATH=$stubs:$LIBRARY_PATH
  build
fi
tests=$(cargo test --release --features cuda --test detector_golden --test detector_predict --no-run --message-format=json 2>/dev/null \
  | "$venv/bin/python" -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
out=$CARGO_TARGET_DIR/gpu-check
rm -rf "$out"; mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/idaics" "$CARGO_TARGET_DIR/release/examples/bench_detector" "$out/"
while read -r name exe; do cp "$exe" "$out/$name"; done <<<"$tests"
strip "$out"/*
# The kernels' PTX makes the binaries large (about 150 MB); compressed they travel in one file.
tar -C "$CARGO_TARGET_DIR" -cf - gpu-check | xz -T0 -6 > "$CARGO_TARGET_DIR/gpu-check.tar.xz"
du -h "$CARGO_TARGET_DIR/gpu-check.tar.xz"
echo "run scripts/gpu-check.sh on the GPU machine with target/cuda/gpu-check.tar.xz carried"
