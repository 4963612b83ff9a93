#!/usr/bin/env bash
# Detector benchmark: candle's YOLOv8-seg forward against PyTorch's (ultralytics' fused,
# channels-last model) on the same weights, input, size and thread count, in one run.
#
#   bench/detector.sh [MODELS=n,s] [SIZES=512] [THREADS=2] [PAIRS=5] [RUNS=10]
#
# For each model and size: PAIRS pairs of runs, candle then PyTorch, each timing RUNS forwards
# after a warm-up and keeping its median; the ratio printed is the median of the pairs' ratios,
# so that a machine busy for a moment weighs on both sides. Weights are a randomly initialised
# yolov8<model>-seg (4 classes) made for the occasion, or WEIGHTS=path (then MODELS is ignored).
# PyTorch comes from $PYTHON (default: python3) with model/tools/requirements.txt installed;
# without it only candle's times are printed. The first line says which CPU kernels ran.
# ISA=avx2 holds both sides to AVX2 on a machine that has AVX-512 (IDAICS_CPU_KERNEL for candle,
# ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY for PyTorch): how an AVX2-only server compares.
set -euo pipefail
if [ "${ISA:-}" = avx2 ]; then
  export IDAICS_CPU_KERNEL=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
IFS=, read -r -a models <<<"${1:-n,s}"
IFS=, read -r -a sizes <<<"${2:-512}"
threads=${3:-2}
pairs=${4:-5}
runs=${5:-10}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet --example bench_detector
if [ -n "${WEIGHTS:-}" ]; then
  models=(given)
fi
have_torch=1
"$python" -c "import torch, ultralytics" 2>/dev/null || have_torch=0
if [ "$have_torch" = 0 ] && [ -z "${WEIGHTS:-}" ]; then
  echo "bench/detector.sh: $python has no torch/ultralytics to make the weights with; install" \
    "model/tools/requirements.txt and set PYTHON, or give WEIGHTS=path to time candle alone" >&2
  exit 1
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo)
width=$(case "$flags" in *avx512f*) echo "AVX-512";; *avx2*) echo "AVX2";; *) echo "no AVX2";; esac)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($width); threads: $threads${ISA:+; both sides held to $ISA}"
for model in "${models[@]}"; do
  if [ "$model" = given ]; then
    weights=$WEIGHTS
  else
    weights="$work/yolov8$model-seg.safetensors"
    "$python" - "$weights" "$model" >/dev/null 2>&1 <<'PY'
import sys, json, torch
from safetensors.torch import save_file
from ultralytics.nn.tasks import SegmentationModel
torch.manual_seed(0)
m = SegmentationModel(f"yolov8{sys.argv[2]}-seg.yaml", nc=4, verbose=False).eval()
save_file({k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}, sys.argv[1],
          metadata={"names": json.dumps(["normal", "schmorl", "bulge", "protrusion"]), "imgsz": "512", "bn_eps": "0.001"})
PY
  fi
  for size in "${sizes[@]}"; do
    results="$work/pairs.jsonl"
    : >"$results"
    for _ in $(seq "$pairs"); do
      candle=$(RAYON_NUM_THREADS=$threads "$root/target/release/examples/bench_detector" "$weights" "$size" "$runs")
      torch=null
      if [ "$have_torch" = 1 ]; then
        torch=$(OMP_NUM_THREADS=$threads "$python" bench/torch_forward.py "$weights" "$size" "$threads" "$runs" 2>/dev/null | tail -n 1)
      fi
      echo "{\"candle\": $candle, \"torch\": $torch}" >>"$results"
    done
    "$python" - "$results" "$model" "$size" <<'PY'
import json, statistics, sys
pairs = [json.loads(line) for line in open(sys.argv[1])]
model, size = sys.argv[2], sys.argv[3]
c = [p["candle"]["median_ms"] for p in pairs]
line = f"yolov8{model}-seg {size}: candle {statistics.median(c):.1f} ms ({pairs[0]['candle']['kernel']} kernels)"
if pairs[0]["torch"] is not None:
    t = [p["torch"]["median_ms"] for p in pairs]
    ratios = [a / b for a, b in zip(c, t)]
    line += (f", {pairs[0]['torch']['peer']} {statistics.median(t):.1f} ms: ratio {statistics.median(ratios):.2f}"
             f" (pairs {min(ratios):.2f}..{max(ratios):.2f}, target <= 1.0)")
else:
    line += ", pytorch not available (install model/tools/requirements.txt and set PYTHON)"
line += f"; candle peak RSS {max(p['candle']['peak_rss_mb'] for p in pairs):.0f} MB"
print(line)
PY
  done
done
