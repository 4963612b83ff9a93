#!/usr/bin/env bash
# Ingest benchmark: sends a synthetic CT series (default 300 slices of 512x512) with DCMTK
# storescu to DCMTK storescp and to the agent, in one run on this machine, and prints the wall-time
# ratio and the agent's peak RSS. Not a test: it asserts nothing, it measures. Each round sends
# one series, the same to every receiver; each round's series has UIDs of its own.
#
#   bench/ingest.sh [SLICES] [SIZE] [ROUNDS]
#
# Both receivers write every instance to disk; the agent also fsyncs each file and its directory
# before answering (its default), storescp does not (it has no such option). storescp runs a
# second time with the syncs the agent makes, done by coreutils `sync` through its synchronous
# exec-on-reception hook, which runs before the C-STORE response goes out; a third storescp runs
# `true` through the same hook, which measures what the fork and exec alone cost. When Orthanc is
# installed it runs as one more receiver that syncs each file. IDAICS_STORAGE_FSYNC=false in the
# environment measures the agent without its syncs.
set -euo pipefail
slices=${1:-300}
size=${2:-512}
rounds=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet --bin idaics --example write_ct_series
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# One series per round, all the same size but with their own UIDs: nothing is overwritten or
# deleted while the clock runs. On ext4 without a journal (as on the development VM), a
# new file skips every inode freed in the last minute, one by one; emptying the receivers'
# directories between rounds made each round pay for the files of the one before.
for r in $(seq 1 "$rounds"); do
  "$root/target/release/examples/write_ct_series" "$work/series-$r" "$slices" "$size" "$((41 + r))" >/dev/null
done
bytes=$(du -sb "$work/series-1" | cut -f1)

port_free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

send() { # port round
  local t0 t1
  t0=$(now)
  TCP_NODELAY=1 storescu -aec IDAICS -R 127.0.0.1 "$1" "$work/series-$2"/*.dcm
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}

# storescp as DCMTK ships it, and storescp accepting the agent's PDU size. A sender cuts each
# instance into PDUs no larger than the receiver accepts: storescp's default is 16384 bytes, the
# agent's 131072, and fewer PDUs cost the sender and the receiver less. The first is the
# comparison of the two as installed, the second of the two doing the same transfer.
agent_pdu=131072
scp_port=$(port_free)
mkdir -p "$work/storescp"
TCP_NODELAY=1 storescp -aet IDAICS --output-directory "$work/storescp" "$scp_port" &
scp_big_port=$(port_free)
mkdir -p "$work/storescp-big"
TCP_NODELAY=1 storescp -aet IDAICS --max-pdu "$agent_pdu" --output-directory "$work/storescp-big" "$scp_big_port" &

# storescp with the agent's syncs (the file's data, then its directory), and with the same hook
# doing nothing.
scp_sync_port=$(port_free)
mkdir -p "$work/storescp-sync"
TCP_NODELAY=1 storescp -aet IDAICS --output-directory "$work/storescp-sync" \
  --exec-on-reception "sync --data #p/#f #p" --exec-sync "$scp_sync_port" &
scp_hook_port=$(port_free)
mkdir -p "$work/storescp-hook"
TCP_NODELAY=1 storescp -aet IDAICS --output-directory "$work/storescp-hook" \
  --exec-on-reception "true" --exec-sync "$scp_hook_port" &

agent_port=$(port_free)
# The series are never completed during the run: an analysis of round 1 would compete with
# round 2 for the two cores.
IDAICS_LOGGING_LEVEL=warn IDAICS_DICOM_BIND_ADDRESS=127.0.0.1 IDAICS_LIMITS_MIN_FREE_DISK_MB=64 \
  IDAICS_LIMITS_MAX_PDU_LENGTH="$agent_pdu" IDAICS_HTTP_ENABLED=false \
  IDAICS_SERIES_COMPLETE_ON_RELEASE=false IDAICS_SERIES_QUIET_PERIOD_S=86400 IDAICS_SERIES_MAX_WAIT_S=86400 \
  "$root/target/release/idaics" serve --port "$agent_port" --state-dir "$work/agent" &
agent_pid=$!
sleep 1

# A second peer that, like the agent, syncs every file before it answers: Orthanc with its
# default SyncStorageArea. It also indexes each instance in SQLite, so it does more work per
# instance than the agent; a fresh one per round, since it would skip instances it already has.
orthanc_round() { # round -> seconds
  local dir="$work/orthanc-$1" port http
  port=$(port_free); http=$(port_free)
  mkdir -p "$dir"
  cat > "$dir/orthanc.json" <<JSON
{ "Name": "bench", "StorageDirectory": "$dir/storage", "IndexDirectory": "$dir/index",
  "DicomAet": "IDAICS", "DicomPort": $port, "HttpPort": $http, "RemoteAccessAllowed": false,
  "DicomCheckCalledAet": false, "DicomAlwaysAllowStore": true, "SyncStorageArea": true,
  "StorageCompression": false, "Plugins": [] }
JSON
  TCP_NODELAY=1 Orthanc --logdir="$dir" "$dir/orthanc.json" 2>/dev/null &
  local pid=$!
  for _ in $(seq 1 100); do echoscu -aec IDAICS 127.0.0.1 "$port" 2>/dev/null && break; sleep 0.1; done
  send "$port" "$1"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
have_orthanc=$(command -v Orthanc >/dev/null && echo yes || echo no)

min() { echo "if ($1 < $2) $1 else $2" | bc -l; }
best_scp=999999; best_scp_big=999999; best_scp_sync=999999; best_scp_hook=999999; best_agent=999999; best_orthanc=999999
paired=(); paired_big=(); paired_sync=()
for r in $(seq 1 "$rounds"); do
  # Each receiver starts with nothing of this round's series waiting to be written back.
  if [ "$have_orthanc" = yes ]; then
    sync; to=$(orthanc_round "$r"); echo "round $r Orthanc:        ${to}s"
    best_orthanc=$(min "$to" "$best_orthanc")
  fi
  sync; ts=$(send "$scp_port" "$r"); echo "round $r storescp:       ${ts}s"
  best_scp=$(min "$ts" "$best_scp")
  sync; tb=$(send "$scp_big_port" "$r"); echo "round $r storescp (big): ${tb}s"
  best_scp_big=$(min "$tb" "$best_scp_big")
  sync; th=$(send "$scp_hook_port" "$r"); echo "round $r storescp+true: ${th}s"
  best_scp_hook=$(min "$th" "$best_scp_hook")
  sync; tsy=$(send "$scp_sync_port" "$r"); echo "round $r storescp+sync: ${tsy}s"
  best_scp_sync=$(min "$tsy" "$best_scp_sync")
  sync; ta=$(send "$agent_port" "$r"); echo "round $r idaics:         ${ta}s"
  best_agent=$(min "$ta" "$best_agent")
  paired+=("$(echo "$ta/$ts" | bc -l)")
  paired_big+=("$(echo "$ta/$tb" | bc -l)")
  paired_sync+=("$(echo "$ta/$tsy" | bc -l)")
done
# This machine's disk and cores are shared: a round can be slow for reasons of its own. The ratio
# of each round's back-to-back pair is the steadier figure.
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
median_pair=$(median "${paired[@]}")
median_pair_big=$(median "${paired_big[@]}")
median_pair_sync=$(median "${paired_sync[@]}")
# What syncing alone costs on this disk: the series' files written again, without any network,
# once plainly and once with the agent's two syncs each (data, then the directory after the
# rename). The difference is the least a receiver that syncs must spend above one that does not.
disk_floor=$(python3 - "$work/series-1" "$work/floor" <<'PY'
import os, shutil, sys, time
src, dst = sys.argv[1], sys.argv[2]
blobs = [open(os.path.join(src, f), "rb").read() for f in sorted(os.listdir(src))]
def run(name, sync):
    # A directory of its own per run, removed only at the end (see the note on deleting above).
    base = f"{dst}/{name}"
    os.makedirs(base + "/tmp"); os.makedirs(base + "/spool")
    spool = os.open(base + "/spool", os.O_RDONLY)
    os.sync()
    t = time.perf_counter()
    for i, blob in enumerate(blobs):
        tmp = f"{base}/tmp/{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, blob)
        if sync: os.fdatasync(fd)
        os.close(fd)
        os.rename(tmp, f"{base}/spool/{i}.dcm")
        if sync: os.fsync(spool)
    elapsed = time.perf_counter() - t
    os.close(spool)
    return elapsed
best = {False: float("inf"), True: float("inf")}
for n in range(3):
    for sync in (False, True):
        best[sync] = min(best[sync], run(f"{n}-{sync}", sync))
shutil.rmtree(dst)
print(best[True] - best[False])
PY
)
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")
stored=$(find "$work/agent/spool" -name '*.dcm' | wc -l)

printf '\nseries: %d slices of %dx%d, %.1f MB\n' "$slices" "$size" "$size" "$(echo "$bytes/1000000" | bc -l)"
printf 'storescp (no fsync), its default PDU of 16384:     %.3f s (best of %d)\n' "$best_scp" "$rounds"
printf 'storescp (no fsync), PDU of %d like the agent: %.3f s (best of %d)\n' "$agent_pdu" "$best_scp_big" "$rounds"
agent_sync=$([ "${IDAICS_STORAGE_FSYNC:-true}" = false ] && echo "no fsync" || echo "fsync")
printf 'idaics (%s):%*s%.3f s (best of %d), %d instances in the spool\n' "$agent_sync" $((40 - ${#agent_sync})) "" "$best_agent" "$rounds" "$stored"
printf 'time ratio idaics/storescp as installed: %.2f best against best, %.2f median of %d paired rounds (target <= 1.2)\n' \
  "$(echo "$best_agent/$best_scp" | bc -l)" "$median_pair" "$rounds"
printf 'time ratio idaics/storescp at equal PDU: %.2f best against best, %.2f median of %d paired rounds\n' \
  "$(echo "$best_agent/$best_scp_big" | bc -l)" "$median_pair_big" "$rounds"
printf 'syncing alone on this disk: %.3f s; storescp plus that: ratio %.2f as installed, %.2f at equal PDU\n' \
  "$disk_floor" "$(echo "($best_scp + $disk_floor)/$best_scp" | bc -l)" "$(echo "($best_scp_big + $disk_floor)/$best_scp_big" | bc -l)"
printf 'storescp syncing as the agent does (sync --data FILE DIR before each answer): %.3f s (best of %d)\n' "$best_scp_sync" "$rounds"
printf '  of which the fork and exec of the hook: %.3f s (storescp running true the same way: %.3f s)\n' \
  "$(echo "$best_scp_hook - $best_scp" | bc -l)" "$best_scp_hook"
printf 'time ratio idaics/syncing storescp: %.2f best against best, %.2f median of %d paired rounds\n' \
  "$(echo "$best_agent/$best_scp_sync" | bc -l)" "$median_pair_sync" "$rounds"
printf 'time ratio idaics/syncing storescp less its hook cost: %.2f best against best\n' \
  "$(echo "$best_agent/($best_scp_sync - $best_scp_hook + $best_scp)" | bc -l)"
if [ "$have_orthanc" = yes ]; then
  printf 'Orthanc (fsync):      %.3f s (best of %d); time ratio idaics/Orthanc: %.2f\n' \
    "$best_orthanc" "$rounds" "$(echo "$best_agent/$best_orthanc" | bc -l)"
fi
printf 'idaics peak RSS: %.1f MB (target < 200 MB)\n' "$(echo "$rss_kb/1024" | bc -l)"
