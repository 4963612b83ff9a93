#!/usr/bin/env bash
# End-to-end benchmark: spine phantom series (300 slices of 512x512 by default) sent by C-STORE to
# the agent, timed from the last C-STORE response to the SR at a DCMTK storescp destination;
# prints each round, the median, the job's stages and the agent's peak RSS.
#
#   bench/series.sh [ROUNDS=5] [SLICES=300] [WEIGHTS=model/phantom-yolov8n-seg.safetensors]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet --bin idaics --example bench_series
exec "$root/target/release/examples/bench_series" "$@"
