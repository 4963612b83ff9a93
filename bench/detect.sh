#!/usr/bin/env bash
# `idaics detect` against ultralytics' `YOLO.predict` on the same images, weights, size and thread
# count, per image: letterbox, forward, NMS and masks, as a user of either runs them.
#
#   PYTHON=/path/to/venv/bin/python bench/detect.sh [THREADS=2] [ROUNDS=3] [IMGSZ=512]
#
# The images are the views the agent's network sees on the real CTs in ../shared/data/real (the
# sagittal and each level's axial, written by `idaics analyze --png`). WEIGHTS (default: the
# shipped phantom weights) are loaded by both sides. Per image: for idaics, the time of a run on
# every image less that of a run on one, over the images less one (start-up and model load cancel);
# for ultralytics, one predict over the list after a warm-up, in one process. Each round runs both;
# the ratio printed is the median of the rounds' ratios. $PYTHON needs model/tools/requirements.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
threads=${1:-2}
rounds=${2:-3}
imgsz=${3:-512}
python=${PYTHON:-python3}
weights=${WEIGHTS:-model/phantom-yolov8n-seg.safetensors}
"$python" -c "import torch, ultralytics" 2>/dev/null || {
  echo "bench/detect.sh: $python has no torch/ultralytics; install model/tools/requirements.txt and set PYTHON" >&2
  exit 1
}
cargo build --release --quiet --bin idaics
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
idaics="$root/target/release/idaics"
for case in ../shared/data/real/*/; do
  [ -d "$case" ] || continue
  "$idaics" analyze "$case" --out "$work/analysis/$(basename "$case")" --png >/dev/null 2>&1 || true
done
mapfile -t images < <(find "$work/analysis" -name '*.png' | sort)
if [ "${#images[@]}" -lt 2 ]; then
  echo "bench/detect.sh: fewer than two images from ../shared/data/real" >&2
  exit 1
fi
seconds() { local start end; start=$(date +%s.%N); "$@" >/dev/null; end=$(date +%s.%N); echo "$end - $start" | bc -l; }
echo "images: ${#images[@]} (views of $(find "$work/analysis" -mindepth 1 -maxdepth 1 | wc -l) real CTs); weights: $weights; imgsz $imgsz; threads: $threads"
: >"$work/rounds"
for round in $(seq "$rounds"); do
  one=$(RAYON_NUM_THREADS=$threads seconds "$idaics" detect --weights "$weights" --device cpu --imgsz "$imgsz" --format json "${images[0]}")
  all=$(RAYON_NUM_THREADS=$threads seconds "$idaics" detect --weights "$weights" --device cpu --imgsz "$imgsz" --format json "${images[@]}")
  ours=$(echo "1000 * ($all - $one) / (${#images[@]} - 1)" | bc -l)
  theirs=$(OMP_NUM_THREADS=$threads YOLO_OFFLINE=1 "$python" - "$weights" "$imgsz" "$threads" "${images[@]}" 2>/dev/null <<'PY' | tail -n 1
import sys, time, torch
from safetensors.torch import load_file
from ultralytics import YOLO
from ultralytics.nn.tasks import SegmentationModel
weights, imgsz, threads, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
torch.set_num_threads(threads)
state = load_file(weights)
scale = {16: "n", 32: "s", 48: "m", 64: "l", 80: "x"}[state["model.0.conv.weight"].shape[0]]
nc = state["model.22.cv3.0.2.weight"].shape[0]
net = SegmentationModel(f"yolov8{scale}-seg.yaml", nc=nc, verbose=False)
net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
yolo = YOLO(f"yolov8{scale}-seg.yaml", task="segment")
yolo.model = net
yolo.predict(images[0], imgsz=imgsz, device="cpu", conf=0.25, iou=0.7, verbose=False)
start = time.perf_counter()
for image in images:
    yolo.predict(image, imgsz=imgsz, device="cpu", conf=0.25, iou=0.7, verbose=False)
print(1000 * (time.perf_counter() - start) / len(images))
PY
)
  printf 'round %s: idaics detect %.1f ms per image, ultralytics predict %.1f ms: ratio %.2f\n' \
    "$round" "$ours" "$theirs" "$(echo "$ours / $theirs" | bc -l)"
  echo "$ours $theirs" >>"$work/rounds"
done
"$python" - "$work/rounds" <<'PY'
import statistics, sys
rows = [tuple(map(float, line.split())) for line in open(sys.argv[1])]
ratios = [a / b for a, b in rows]
print(f"median: idaics detect {statistics.median(a for a, _ in rows):.1f} ms per image, ultralytics predict "
      f"{statistics.median(b for _, b in rows):.1f} ms: ratio {statistics.median(ratios):.2f} (target <= 1.1)")
PY
