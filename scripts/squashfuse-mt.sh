#!/usr/bin/env bash
# A multithreaded squashfuse_ll for the tests and benchmarks (Debian 12's 0.1.x serves on
# one thread): Debian 13's squashfuse 0.5 and the libraries it needs, unpacked with
# `dpkg -x` into a private prefix and started through that prefix's own loader by a
# small wrapper. capsid hands the server its FUSE fd, so no fusermount is involved.
# A test set-up, not how sites install one (see the README's "Image server").
# Prints the wrapper's path; prints nothing (and exits 0) where Debian 13 cannot be reached,
# and the tests that need it skip.
set -euo pipefail
cache=${CAPSID_TEST_CACHE:-/var/cache/capsid-test}
prefix="$cache/squashfuse-mt"
packages="squashfuse libsquashfuse0 libfuse3-4 libc6 libzstd1 liblzma5 liblz4-1 zlib1g liblzo2-2"
if [ "$(dpkg --print-architecture)" != amd64 ]; then
    echo "squashfuse-mt: the wrapper is written for amd64; skipping" >&2
    exit 0
fi
if [ ! -f "$prefix/.complete-1" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
    touch "$work/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian trixie main" >"$work/sources.list"
    apt=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/nonexistent
         -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
         -o "Dir::State::status=$work/status" -o APT::Sandbox::User=root -q)
    if ! apt-get "${apt[@]}" update >&2 || \
            ! (cd "$work/debs" && apt-get "${apt[@]}" download $packages >&2); then
        echo "squashfuse-mt: Debian 13's packages are out of reach; skipping" >&2
        exit 0
    fi
    rm -rf "$prefix" && mkdir -p "$prefix"
    for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$prefix/root"; done
    cat >"$prefix/squashfuse_ll" <<EOF
#!/bin/sh
exec "$prefix/root/usr/lib64/ld-linux-x86-64.so.2" \\
    --library-path "$prefix/root/usr/lib/x86_64-linux-gnu" \\
    "$prefix/root/usr/bin/squashfuse_ll" "\$@"
EOF
    chmod -R a+rX "$prefix" && chmod 755 "$prefix/squashfuse_ll"
    touch "$prefix/.complete-1"
fi
echo "$prefix/squashfuse_ll"
