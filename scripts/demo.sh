#!/usr/bin/env bash
# The main job on a fresh Debian machine: installs what the build needs (cmake and pkg-config for
# the CharLS JPEG-LS codec), builds the agent and runs `idaics demo`: a synthetic spine CT study
# through the whole path. Arguments go to `idaics demo` (see `idaics demo --help`).
# Usage: scripts/demo.sh [--out DIR] [--levels "L4/L5=protrusion,..."]   (as root, or with sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-packages.sh cmake pkg-config
exec cargo run --release --locked --quiet -- demo "$@"
