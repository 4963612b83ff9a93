#!/usr/bin/env bash
# Ingest benchmark: sends the same synthetic CT series (default 300 slices of 512x512) with DCMTK
# storescu to DCMTK storescp and to the agent, in one run on this machine, and prints the wall-time
# ratio and the agent's peak RSS. Not a test: it asserts nothing, it measures.
#
#   bench/ingest.sh [SLICES] [SIZE] [ROUNDS]
#
# Both receivers write every instance to disk; the agent also fsyncs each file and its directory
# before answering (its default), storescp does not (it has no such option).
set -euo pipefail
slices=${1:-300}
size=${2:-512}
rounds=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet --bin idaics --example write_ct_series
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$root/target/release/examples/write_ct_series" "$work/series" "$slices" "$size" 42 >/dev/null
bytes=$(du -sb "$work/series" | cut -f1)

port_free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

send() { # port
  local t0 t1
  t0=$(now)
  TCP_NODELAY=1 storescu -aec IDAICS -R 127.0.0.1 "$1" "$work"/series/*.dcm
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}

scp_port=$(port_free)
mkdir -p "$work/storescp"
TCP_NODELAY=1 storescp -aet IDAICS --output-directory "$work/storescp" "$scp_port" &
scp_pid=$!

agent_port=$(port_free)
# The series is never completed during the run: an analysis of round 1 would compete with round 2
# for the two cores, and the spool is emptied between rounds under it.
IDAICS_LOGGING_LEVEL=warn IDAICS_DICOM_BIND_ADDRESS=127.0.0.1 IDAICS_LIMITS_MIN_FREE_DISK_MB=64 \
  IDAICS_SERIES_COMPLETE_ON_RELEASE=false IDAICS_SERIES_QUIET_PERIOD_S=86400 IDAICS_SERIES_MAX_WAIT_S=86400 \
  "$root/target/release/idaics" serve --port "$agent_port" --state-dir "$work/agent" &
agent_pid=$!
sleep 1

best_scp=999999; best_agent=999999; paired=()
for r in $(seq 1 "$rounds"); do
  rm -rf "$work/storescp"/*; ts=$(send "$scp_port"); echo "round $r storescp: ${ts}s"
  best_scp=$(echo "if ($ts < $best_scp) $ts else $best_scp" | bc -l)
  rm -rf "$work/agent/spool"/*; ta=$(send "$agent_port"); echo "round $r idaics:   ${ta}s"
  best_agent=$(echo "if ($ta < $best_agent) $ta else $best_agent" | bc -l)
  paired+=("$(echo "$ta/$ts" | bc -l)")
done
# This machine's disk and cores are shared: a round can be slow for reasons of its own. The ratio
# of each round's back-to-back pair is the steadier figure.
median_pair=$(printf '%s\n' "${paired[@]}" | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}')
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")
stored=$(find "$work/agent/spool" -name '*.dcm' | wc -l)

printf '\nseries: %d slices of %dx%d, %.1f MB\n' "$slices" "$size" "$size" "$(echo "$bytes/1000000" | bc -l)"
printf 'storescp (no fsync):  %.3f s (best of %d)\n' "$best_scp" "$rounds"
printf 'idaics (fsync):       %.3f s (best of %d), %d instances in the spool\n' "$best_agent" "$rounds" "$stored"
printf 'time ratio idaics/storescp: %.2f best against best, %.2f median of %d paired rounds (target <= 1.2)\n' \
  "$(echo "$best_agent/$best_scp" | bc -l)" "$median_pair" "$rounds"
printf 'idaics peak RSS: %.1f MB (target < 200 MB)\n' "$(echo "$rss_kb/1024" | bc -l)"
