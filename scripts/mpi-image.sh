#!/usr/bin/env bash
# Make (once, then reuse) the MPI test image: Debian bookworm minbase with Debian's Open MPI
# (4.1, with PMIx) and tests/support/mpi/mpitest.c built against it, as a sandbox and a SIF
# built by capsid; and the same program for the host, for side-by-side runs. Needs root
# (mmdebstrap) and the host's libopenmpi-dev. Prints the directory that holds mpi.sif and
# mpitest (the host build).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${CAPSID_TEST_CACHE:-/var/cache/capsid-test}
src=tests/support/mpi/mpitest.c
mkdir -p "$cache"
stamp="$cache/mpi/.complete-$(sha256sum "$src" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    rm -rf "$cache/mpi"
    mmdebstrap --quiet --variant=minbase --include=openmpi-bin,libpmix2 bookworm \
        "$cache/mpi" http://deb.debian.org/debian >&2
    mpicc -O2 -o "$cache/mpi/usr/local/bin/mpitest" "$src"
    touch "$stamp"
fi
if [ ! -f "$cache/mpi.sif" ] || [ "$stamp" -nt "$cache/mpi.sif" ]; then
    .venv/bin/capsid build --force "$cache/mpi.sif" "$cache/mpi" >&2
fi
mpicc -O2 -o "$cache/mpitest" "$src"
chmod a+rx "$cache" "$cache/mpitest" && chmod a+r "$cache/mpi.sif"
echo "$cache"
