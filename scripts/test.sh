#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what the tests talk to (DCMTK for the
# real DICOM peers, Orthanc as a real PACS, cmake for the CharLS JPEG-LS codec build, PostgreSQL
# whose server binaries the database tests run as throwaway clusters, dicom3tools for dciodvfy,
# lintian, dpkg-dev and systemd-analyze for the Debian package, strace for the unit's system call
# filter, openssl for the DICOM TLS tests' certificates, promtool (package prometheus) that checks
# /metrics as a Prometheus server would read it, a Python venv with highdicom in
# target/pyenv, and one with the training recipe's pinned torch and ultralytics in
# target/trainenv, about 6 GB and 2 minutes), then runs every test, including one that installs,
# runs and purges the Debian package (as root; tests/package.rs refuses to touch a machine where
# IDAICS is installed).
# IDAICS_TEST_DPKG=0 leaves that one out.
# Usage: scripts/test.sh   (as root, or with sudo available; the install test needs root)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-packages.sh dcmtk orthanc cmake pkg-config postgresql dicom3tools python3-venv lintian dpkg-dev systemd strace openjph-tools openssl prometheus

# highdicom (PyPI) reads the agent's SR and SEG back in tests/report.rs.
pyenv=target/pyenv
if ! "$pyenv/bin/python" -c "import highdicom" 2>/dev/null; then
  python3 -m venv "$pyenv"
  "$pyenv/bin/pip" install -q "highdicom==0.28.2"
fi
export IDAICS_PYTHON="$PWD/$pyenv/bin/python"

# The training recipe (model/tools/train.py) runs once in the suite, one tiny epoch on the CPU, in
# the test of the whole loop from export to a reloaded agent (tests/training_tools.rs). The agent
# itself never needs Python; the CUDA wheels come with PyPI's torch but stay unused.
trainenv=target/trainenv
if ! "$trainenv/bin/python" -c "import torch, ultralytics, safetensors" 2>/dev/null; then
  python3 -m venv "$trainenv"
  "$trainenv/bin/pip" install -q --no-cache-dir -r model/tools/requirements.txt
fi
export IDAICS_TRAIN_PYTHON="$PWD/$trainenv/bin/python"

test -d ../shared/data/corpora || { echo "shared test data not found at ../shared/data" >&2; exit 1; }

# A test build needs about 3 GB (2.2 GB measured); say so plainly rather than die in the linker.
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((5 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free on $(df -P . | awk 'NR==2 {print $6}'); the test build needs about 3 GB" >&2
fi
# A suite run builds once: incremental state would only take disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Two cores here: the integration tests start several agents and DCMTK processes each.
export RUST_BACKTRACE=1
cargo test --all-targets --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"
# The network against ultralytics again on the lesser CPU kernels: the run above used the best
# this CPU has, and servers without AVX-512 (or without AVX2) take the others.
for kernel in avx2 portable; do
  IDAICS_CPU_KERNEL=$kernel cargo test --locked --test detector_golden --test detector_predict
done
# And with every 3x3 convolution direct, as before Winograd's F(2x2, 3x3) took the wide ones.
IDAICS_CPU_WINOGRAD=0 cargo test --locked --test detector_golden --test detector_predict

# The package's install test changes the machine it runs on (a package, a system user), so it is
# ignored above and run here, on the throwaway machine this command is for.
if [ "${IDAICS_TEST_DPKG:-1}" = 0 ]; then
  echo "IDAICS_TEST_DPKG=0: the Debian package was not installed" >&2
elif [ "$(id -u)" -ne 0 ]; then
  echo "not root: the Debian package was not installed (as root on a throwaway machine:" \
    "cargo test --test package -- --ignored)" >&2
else
  cargo test --locked --test package -- --ignored
fi
