#!/usr/bin/env bash
# The CPU benchmarks issue 26 is judged by, from one command: candle against PyTorch per forward
# (bench/detector.sh, n and s at 512, 2 threads), `idaics detect` against ultralytics predict per
# image (bench/detect.sh), and the end-to-end time of 300-slice 512x512 series from the sender's
# last C-STORE response to the SR at a DCMTK storescp, with the job's stages and the agent's peak
# RSS (bench/series.sh, median of 5). Each prints its own ratios and targets.
#
#   PYTHON=/path/to/venv/bin/python bench/all.sh
set -euo pipefail
cd "$(dirname "$0")"
./detector.sh n,s 512 2 5 10
./detect.sh 2 3 512
./series.sh 5 300
