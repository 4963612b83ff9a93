#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what the tests talk to (DCMTK for the
# real DICOM peers, Orthanc as a real PACS, cmake for the CharLS JPEG-LS codec build, PostgreSQL
# whose server binaries the database tests run as throwaway clusters, dicom3tools for dciodvfy,
# lintian, dpkg-dev and systemd-analyze for the Debian package, and a Python venv with highdicom
# in target/pyenv), then runs every test. As root it also installs, runs and purges the Debian
# package (tests/package.rs refuses to touch a machine where IDAICS is installed);
# IDAICS_TEST_DPKG=0 leaves that out.
# Usage: scripts/test.sh   (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-packages.sh dcmtk orthanc cmake pkg-config postgresql dicom3tools python3-venv lintian dpkg-dev systemd

# highdicom (PyPI) reads the agent's SR and SEG back in tests/report.rs.
pyenv=target/pyenv
if ! "$pyenv/bin/python" -c "import highdicom" 2>/dev/null; then
  python3 -m venv "$pyenv"
  "$pyenv/bin/pip" install -q "highdicom==0.28.2"
fi
export IDAICS_PYTHON="$PWD/$pyenv/bin/python"

test -d ../shared/data/corpora || { echo "shared test data not found at ../shared/data" >&2; exit 1; }

# A test build needs about 3 GB (2.2 GB measured); say so plainly rather than die in the linker.
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((5 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free on $(df -P . | awk 'NR==2 {print $6}'); the test build needs about 3 GB" >&2
fi
# A suite run builds once: incremental state would only take disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if [ "$(id -u)" -eq 0 ]; then
  export IDAICS_TEST_DPKG="${IDAICS_TEST_DPKG:-1}"
fi

# Two cores here: the integration tests start several agents and DCMTK processes each.
export RUST_BACKTRACE=1
cargo test --all-targets --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"
