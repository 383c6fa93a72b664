#!/usr/bin/env bash
# Install what capsid and its tests need on Debian 12, then capsid itself in .venv.
# Safe to run again: it installs only what is missing. Uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages, and why each is here:
#   squashfs-tools-ng  tar2sqfs/sqfs2tar: squashfs straight from a tar stream (image writes)
#   squashfs-tools     unsquashfs -o: read a partition in place inside a SIF (inspect, sandbox)
#   squashfuse fuse3   squashfuse_ll: mount images without privileges (runtime)
#   fuse-overlayfs     writable overlays where kernel overlayfs is refused (overlay images)
#   fuse2fs            overlay images (ext3) without privileges, as Apptainer serves them
#   uidmap             newuidmap/newgidmap for --fakeroot with subordinate ids
#   busybox-static     a tiny real root filesystem for the demo and tests
#   golang-go golang-github-sylabs-sif-dev  the reference SIF library, to cross-check our files
#   bubblewrap charliecloud-runtime          peers for the benchmarks
#   python3-venv       the venv, made from Debian's /usr/bin/python3 so ordinary users can run it
#   mmdebstrap         a Debian+python3 root filesystem for the runtime tests and benchmarks
#   docker-registry apache2-utils openssl   a real registry (TLS, htpasswd) for the OCI tests
#   buildah umoci skopeo golang-github-containers-common
#                      real tools that write the OCI images, archives and layouts capsid reads,
#                      and read what capsid pushes; skopeo+umoci are also Apptainer's path
#   charliecloud-builders                    ch-image/ch-convert, a peer in the pull benchmark
#   libseccomp2        root emulation in build steps (pyseccomp calls it)
#   tar                unpacks base images into the build cache
#   libcap2-bin        setcap, for the test image's file capabilities
#   time               GNU time: peak memory in bench/ and scripts/bombs.sh
#   gcc libc6-dev      the fake GPU driver of the tests (scripts/fake-gpu.sh)
#   openmpi-bin libopenmpi-dev libpmix-dev   MPI jobs in the tests and bench/mpi_startup.py
#   slurm-wlm munge    the tests' two-node cluster (scripts/slurm-cluster.sh); libpmix-dev is
#                      installed with it, so slurmd finds PMIx when it first starts
packages=(squashfs-tools-ng squashfs-tools squashfuse fuse3 fuse-overlayfs fuse2fs uidmap
          busybox-static golang-go golang-github-sylabs-sif-dev bubblewrap charliecloud-runtime
          python3-venv util-linux procps mmdebstrap docker-registry apache2-utils openssl
          buildah umoci skopeo golang-github-containers-common charliecloud-builders
          libseccomp2 tar libcap2-bin time gcc libc6-dev openmpi-bin libopenmpi-dev libpmix-dev
          slurm-wlm munge)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# Distributions ship /dev/fuse world-usable; some VMs do not.
if [ -e /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    as_root chmod 0666 /dev/fuse
fi

if [ ! -x .venv/bin/capsid ] || [ pyproject.toml -nt .venv/.capsid-installed ]; then
    /usr/bin/python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    touch .venv/.capsid-installed
fi
# Byte-compile now: an ordinary user cannot write __pycache__ into this checkout, and
# compiling capsid on every container start would cost tens of milliseconds.
.venv/bin/python -m compileall -q src >/dev/null
echo "setup: ready ($(.venv/bin/capsid --version))"
