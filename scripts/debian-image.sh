#!/usr/bin/env bash
# Make (once, then reuse) a Debian bookworm minbase image with python3 for the tests and
# benchmarks: a sandbox directory and a SIF built from it by capsid. A setuid-root copy of
# busybox is added so the tests can prove it gives no privilege. Needs root (mmdebstrap).
# Prints the directory that holds them: debian-python3/ and debian-python3.sif.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${CAPSID_TEST_CACHE:-/var/cache/capsid-test}
mkdir -p "$cache"
if [ ! -f "$cache/debian-python3/.complete-3" ]; then
    rm -rf "$cache/debian-python3"
    mmdebstrap --quiet --variant=minbase --include=python3-minimal,python-is-python3 bookworm \
        "$cache/debian-python3" http://deb.debian.org/debian >&2
    mkdir -p "$cache/debian-python3/usr/local/suid"
    install -m 4755 -o root -g root /bin/busybox "$cache/debian-python3/usr/local/suid/busybox"
    touch "$cache/debian-python3/.complete-3"
fi
if [ ! -f "$cache/debian-python3.sif" ] || [ "$cache/debian-python3/.complete-3" -nt "$cache/debian-python3.sif" ]; then
    .venv/bin/capsid build --force "$cache/debian-python3.sif" "$cache/debian-python3" >&2
fi
chmod a+rx "$cache" && chmod a+r "$cache/debian-python3.sif"
echo "$cache"
