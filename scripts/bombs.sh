#!/usr/bin/env bash
# Decompression bombs at the sizes of issue #10: a 10 GB-of-zeros gzip layer and an
# 8 GiB-of-zeros zstd layer, each converted to a SIF under /usr/bin/time -v.
# Prints each conversion's peak RSS (it must stay under 256 MiB) and checks the image.
# Usage: scripts/bombs.sh [WORKDIR]   (needs scripts/setup.sh first; ~1 minute, little disk)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
status=0
for spec in gzip:10000000000 zstd:8589934592; do
    kind=${spec%%:*} size=${spec#*:}
    rm -rf "$work/$kind" "$work/$kind.sif"
    .venv/bin/python - "$work/$kind" "$kind" "$size" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.support.bombs import MEDIA, bomb_layer, make_layout
layer = bomb_layer(int(sys.argv[3]), sys.argv[2])
make_layout(Path(sys.argv[1]), [(layer, MEDIA[sys.argv[2]])])
print(f"bombs: {sys.argv[2]} layer of {int(sys.argv[3])} zero bytes is {len(layer)} bytes")
PY
    /usr/bin/time -v -o "$work/$kind.time" .venv/bin/capsid build "$work/$kind.sif" "oci:$work/$kind"
    peak_kib=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/$kind.time")
    elapsed=$(awk -F': ' '/Elapsed/ {print $2}' "$work/$kind.time")
    stored=$(.venv/bin/python -c "
import subprocess, sys
out = subprocess.run(['unsquashfs', '-lls', '-o', sys.argv[2], sys.argv[1], 'zeros'],
                     capture_output=True, text=True).stdout.split()
print(out[out.index('squashfs-root/zeros') - 3] if 'squashfs-root/zeros' in out else '?')
" "$work/$kind.sif" "$(.venv/bin/python -c "
from capsid.image.locate import locate; import sys; print(locate(sys.argv[1]).offset)" "$work/$kind.sif")")
    echo "bombs: $kind: peak RSS $((peak_kib / 1024)) MiB, $elapsed, /zeros in the SIF is $stored bytes (want $size), SIF $(stat -c %s "$work/$kind.sif") bytes"
    [ "$peak_kib" -lt $((256 * 1024)) ] || { echo "bombs: $kind: over 256 MiB" >&2; status=1; }
    [ "$stored" = "$size" ] || { echo "bombs: $kind: wrong size" >&2; status=1; }
    rm -rf "$work/$kind"
done
exit "$status"
