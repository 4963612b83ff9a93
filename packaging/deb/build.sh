#!/usr/bin/env bash
# Builds the Debian package a PACS administrator installs: idaics_<version>_<arch>.deb.
#
#   packaging/deb/build.sh [--binary PATH] [--out DIR]
#
# DEB_MAINTAINER in the environment sets the Maintainer field (the default is a placeholder
# address: set the team's real one for a release).
# Without --binary it builds the release binary first (CPU-only; a CUDA build from
# scripts/build-cuda.sh can be packaged by naming it). The package holds:
#   /usr/bin/idaics                                   the agent (stripped)
#   /etc/idaics/idaics.toml                           the configuration (a conffile: upgrades keep edits)
#   /lib/systemd/system/idaics.service                the hardened unit
#   /usr/share/idaics/phantom-yolov8n-seg.safetensors the phantom test model `idaics demo` uses
#   /usr/share/doc/idaics/                            README and docs/ (operations, the DICOM conformance
#                                                     statement, design, benchmarks),
#                                                     the model card, copyright, third-party licences
#   /usr/share/man/man1/idaics.1.gz                   the manual page, from the binary's --help
# Its maintainer scripts create the system user `idaics`, and enable and start the service where
# systemd runs. Needs dpkg-dev (dpkg-shlibdeps works out the shared-library dependencies).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
binary=""
out="$root/target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture dpkg-parsechangelog strip python3 rustc; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install dpkg-dev binutils python3)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
changelog_version=$(sed -n '1s/^idaics (\([^)]*\)).*/\1/p' "$here/changelog")
# The package's version is the crate's: the two must not drift apart silently.
if [ "$version" != "$changelog_version" ]; then
  echo "Cargo.toml says version $version but packaging/deb/changelog's latest entry is $changelog_version" >&2
  exit 1
fi
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
# Dates come from the changelog's entry, not the build's clock: the same inputs give the same
# package, byte for byte.
epoch=$(dpkg-parsechangelog -l "$here/changelog" -S Timestamp)
export SOURCE_DATE_EPOCH=$epoch

if [ -z "$binary" ]; then
  (cd "$root" && cargo build --release --locked --bin idaics)
  binary="$root/target/release/idaics"
fi
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage="$work/idaics_${version}_${arch}"
umask 022
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/idaics" "$stage/lib/systemd/system" \
  "$stage/usr/share/idaics" "$stage/usr/share/doc/idaics"

install -m 0755 "$binary" "$stage/usr/bin/idaics"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/idaics"
install -m 0644 "$root/conf/idaics.toml" "$stage/etc/idaics/idaics.toml"
install -m 0644 "$root/packaging/idaics.service" "$stage/lib/systemd/system/idaics.service"
install -m 0644 "$root/model/phantom-yolov8n-seg.safetensors" "$stage/usr/share/idaics/"
install -m 0644 "$root/README.md" "$stage/usr/share/doc/idaics/README.md"
install -d "$stage/usr/share/doc/idaics/docs"
install -m 0644 "$root"/docs/*.md "$stage/usr/share/doc/idaics/docs/"
install -m 0644 "$root/model/README.md" "$stage/usr/share/doc/idaics/MODEL.md"
install -m 0644 "$here/copyright" "$stage/usr/share/doc/idaics/copyright"
gzip -9n < "$here/changelog" > "$stage/usr/share/doc/idaics/changelog.gz"
install -d "$stage/usr/share/man/man1"
"$here/manpage.sh" "$stage/usr/bin/idaics" "$(date -u -d "@$epoch" +%Y-%m-%d)" \
  | gzip -9n > "$stage/usr/share/man/man1/idaics.1.gz"
chmod 0644 "$stage/usr/share/doc/idaics/changelog.gz" "$stage/usr/share/man/man1/idaics.1.gz"

# What the binary links statically, from the lock file.
host=$(rustc -vV | sed -n 's/^host: //p')
(cd "$root" && cargo metadata --format-version 1 --locked --filter-platform "$host") \
  | python3 "$here/third_party.py" > "$stage/usr/share/doc/idaics/THIRD-PARTY"
chmod 0644 "$stage/usr/share/doc/idaics/THIRD-PARTY"

for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$stage/DEBIAN/$script"
done
echo /etc/idaics/idaics.toml > "$stage/DEBIAN/conffiles"
# For `dpkg --verify idaics`: an administrator can check that no installed file was altered.
# Conffiles are left out, as dh_md5sums does: dpkg keeps their sums itself, and edits are expected.
(cd "$stage" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/conffiles"

# dpkg-shlibdeps reads a source package's debian/control; a minimal one will do.
mkdir -p "$work/src/debian"
printf 'Source: idaics\n\nPackage: idaics\nArchitecture: any\n' > "$work/src/debian/control"
shlib_depends=$(cd "$work/src" && dpkg-shlibdeps -O -e "$stage/usr/bin/idaics" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
installed_kb=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)

cat > "$stage/DEBIAN/control" <<CONTROL
Package: idaics
Version: $version
Architecture: $arch
Maintainer: ${DEB_MAINTAINER:-IDAICS team <packaging@idaics.example>}
Installed-Size: $installed_kb
Depends: $shlib_depends, adduser
Section: science
Priority: optional
Description: intervertebral disc classification agent for spine CT (DICOM SCP)
 IDAICS sits beside a PACS. Scanners or the PACS send it spine CT series by
 DICOM C-STORE; for each complete series it finds the intervertebral disc
 levels, classifies each disc as normal, Schmorl's node, bulge or protrusion
 with a YOLOv8-seg network, and sends the findings back as a DICOM Structured
 Report, a Segmentation and the key slices. Every association, series, job and
 finding is logged in a database (SQLite by default, or PostgreSQL).
 .
 The service listens on DICOM port 11112 (AE title IDAICS) once installed;
 edit /etc/idaics/idaics.toml, then: systemctl restart idaics.
CONTROL

find "$stage" -exec touch --no-dereference --date="@$epoch" {} +

mkdir -p "$out"
deb="$out/idaics_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
