#!/usr/bin/env bash
# Writes idaics(1) in roff to stdout from the binary's own --help texts, so the manual page says
# exactly what the installed binary accepts. Usage: manpage.sh BINARY DATE
set -euo pipefail
binary=$1
date=$2
version=$("$binary" --version | awk '{print $2}')

# Help text as literal roff: backslashes escaped, lines that would read as requests protected.
literal() { sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"; }

cat <<ROFF
.TH IDAICS 1 "$date" "idaics $version" "IDAICS"
.SH NAME
idaics \\- intervertebral disc classification agent for spine CT (DICOM SCP beside the PACS)
.SH SYNOPSIS
.B idaics
.I command
.RI [ options ]
.SH DESCRIPTION
.nf
ROFF
"$binary" --help | literal
echo ".fi"
echo ".SH COMMANDS"
"$binary" --help | awk '/^Commands:/ {on=1; next} /^$/ {on=0} on && $1 != "help" {print $1}' | while read -r command; do
  echo ".SS $command"
  echo ".nf"
  "$binary" "$command" --help | literal
  echo ".fi"
done
cat <<'ROFF'
.SH FILES
.TP
.I /etc/idaics/idaics.toml
The configuration; every key is documented in place. Keys can be overridden by
IDAICS_<SECTION>_<KEY> environment variables, and those by the command-line flags.
.TP
.I /var/lib/idaics
The state directory: the spool of received instances, the embedded database and the outputs.
.TP
.I /usr/share/idaics/phantom-yolov8n-seg.safetensors
The phantom test model that \fBidaics demo\fR uses; not for clinical use.
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1);
/usr/share/doc/idaics/README.md; docs/operations.md, docs/conformance.md (the DICOM conformance
statement), docs/design.md and docs/benchmarks.md beside it; MODEL.md.
ROFF
