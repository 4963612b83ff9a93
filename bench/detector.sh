#!/usr/bin/env bash
# Detector benchmark: candle's YOLOv8-seg forward against PyTorch's on the same weights, input size
# and thread count, in one run. Prints both times, the ratio and candle's peak RSS.
#
#   bench/detector.sh [WEIGHTS] [SIZE=512] [THREADS=2] [RUNS=10]
#
# WEIGHTS defaults to a randomly initialised yolov8n-seg (4 classes) written for the occasion.
# PyTorch comes from $PYTHON (default: python3) with ultralytics installed; without it only
# candle's numbers are printed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
size=${2:-512}
threads=${3:-2}
runs=${4:-10}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet --example bench_detector
weights=${1:-}
if [ -z "$weights" ]; then
  weights="$work/yolov8n-seg-random.safetensors"
  "$python" - "$weights" >/dev/null <<'PY'
import sys, json, torch
from safetensors.torch import save_file
from ultralytics.nn.tasks import SegmentationModel
m = SegmentationModel("yolov8n-seg.yaml", nc=4, verbose=False).eval()
save_file({k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}, sys.argv[1],
          metadata={"names": json.dumps(["normal", "schmorl", "bulge", "protrusion"]), "imgsz": "512", "bn_eps": "0.001"})
PY
fi
# Same thread count on both sides: candle through rayon, PyTorch through set_num_threads.
candle=$(RAYON_NUM_THREADS=$threads "$root/target/release/examples/bench_detector" "$weights" "$size" "$runs")
echo "candle:  $candle"
if torch=$(OMP_NUM_THREADS=$threads "$python" bench/torch_forward.py "$weights" "$size" "$threads" "$runs" 2>/dev/null | tail -n 1) && [ -n "$torch" ]; then
  echo "pytorch: $torch"
  "$python" - "$candle" "$torch" <<'PY'
import json, sys
c, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"forward {c['median_ms']:.1f} ms (candle) vs {t['median_ms']:.1f} ms (pytorch): ratio {c['median_ms'] / t['median_ms']:.2f} (target <= 2.0)")
print(f"candle peak RSS {c['peak_rss_mb']:.0f} MB")
PY
else
  echo "pytorch: not available (install model/tools/requirements.txt and set PYTHON)"
fi
