#!/usr/bin/env bash
# Make (once, then reuse) a Debian bookworm minbase image with python3 for the tests and
# benchmarks: a sandbox directory and a SIF built from it by capsid. A setuid-root copy of
# busybox, a busybox with file capabilities and a /dev/mem device node are added so the
# tests can prove they give no privilege. Needs root (mmdebstrap, setcap, mknod).
# Prints the directory that holds them: debian-python3/ and debian-python3.sif.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${CAPSID_TEST_CACHE:-/var/cache/capsid-test}
mkdir -p "$cache"
if [ ! -f "$cache/debian-python3/.complete-4" ]; then
    rm -rf "$cache/debian-python3"
    mmdebstrap --quiet --variant=minbase --include=python3-minimal,python-is-python3 bookworm \
        "$cache/debian-python3" http://deb.debian.org/debian >&2
    mkdir -p "$cache/debian-python3/usr/local/suid" "$cache/debian-python3/usr/local/caps"
    install -m 4755 -o root -g root /bin/busybox "$cache/debian-python3/usr/local/suid/busybox"
    # A file capability and a device node that would read any file or all memory, for the
    # tests that prove an image's privileges stay inert.
    install -m 755 /bin/busybox "$cache/debian-python3/usr/local/caps/busybox"
    setcap cap_dac_override,cap_dac_read_search+ep "$cache/debian-python3/usr/local/caps/busybox"
    mknod -m 666 "$cache/debian-python3/opt/mem" c 1 1
    touch "$cache/debian-python3/.complete-4"
fi
if [ ! -f "$cache/debian-python3.sif" ] || [ "$cache/debian-python3/.complete-4" -nt "$cache/debian-python3.sif" ]; then
    .venv/bin/capsid build --force "$cache/debian-python3.sif" "$cache/debian-python3" >&2
fi
chmod a+rx "$cache" && chmod a+r "$cache/debian-python3.sif"
echo "$cache"
