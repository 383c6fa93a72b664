#!/usr/bin/env bash
# capsid's main job, end to end on a built-in example: a root filesystem made from
# Debian's busybox-static → one SIF file → inspect it → list its objects → run in it,
# as an ordinary user would, with a directory of theirs bound in.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
capsid=$PWD/.venv/bin/capsid
work=$(mktemp -d "${TMPDIR:-/tmp}/capsid-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
scripts/busybox-sandbox.sh "$work/rootfs"
mkdir -p "$work/rootfs/.singularity.d"
printf '{"org.capsid.demo": "busybox"}' >"$work/rootfs/.singularity.d/labels.json"
printf '#!/bin/sh\necho "Hello from $(uname -s) in a capsid container"\n' \
    >"$work/rootfs/.singularity.d/runscript"
chmod 755 "$work/rootfs/.singularity.d/runscript"
step "$capsid" build "$work/busybox.sif" "$work/rootfs"
step "$capsid" inspect "$work/busybox.sif"
step "$capsid" inspect --runscript "$work/busybox.sif"
step "$capsid" sif list "$work/busybox.sif"
step "$capsid" build --sandbox "$work/unpacked" "$work/busybox.sif"
mkdir -p "$work/data" && echo "input data" >"$work/data/input.txt"
step "$capsid" run "$work/busybox.sif"
step "$capsid" exec -B "$work/data:/data:ro" "$work/busybox.sif" sh -c 'id -un; cat /data/input.txt'
echo; echo "demo: done"
