#!/usr/bin/env bash
# The main job on a fresh Debian machine: installs what the build needs (cmake and pkg-config for
# the CharLS JPEG-LS codec), builds the agent and runs `idaics demo`: a synthetic spine CT study
# through the whole path. Arguments go to `idaics demo` (see `idaics demo --help`).
# Usage: scripts/demo.sh [--out DIR] [--levels "L4/L5=protrusion,..."]   (as root, or with sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec cargo run --release --locked --quiet -- demo "$@"
