#!/usr/bin/env bash
# Make (once, then reuse) OCI test images with real tools (buildah, umoci), as the files
# users bring: oci-archive, docker-archive (docker save format) and OCI layouts.
#   busybox.{oci,docker}.tar, busybox-layout/  one layer, Cmd/Env/Labels/WorkingDir set
#   busybox2-layout/                             a second layer by umoci: deletions (whiteouts)
#   debian-python3.{oci,docker}.tar              the ~200 MB Debian bookworm + python3 image
# Needs root (buildah) and scripts/debian-image.sh's output. Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${CAPSID_TEST_CACHE:-/var/cache/capsid-test}
out=$cache/oci
stamp=$out/.complete-4
if [ -f "$stamp" ]; then echo "$out"; exit 0; fi
rm -rf "$out" && mkdir -p "$out"
work=$(mktemp -d) && trap 'rm -rf "$work"' EXIT
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

scripts/busybox-sandbox.sh "$work/busybox" >/dev/null
ctr=$(buildah from scratch)
buildah copy -q "$ctr" "$work/busybox" / >/dev/null
buildah config --cmd '["/bin/sh","-c","echo hello from $0"]' --env GREETING=bonjour \
    --label org.capsid.test=busybox --workingdir /tmp "$ctr"
buildah commit -q --rm "$ctr" capsid-test/busybox:1 >/dev/null
buildah push -q capsid-test/busybox:1 "oci-archive:$out/busybox.oci.tar:busybox:1"
buildah push -q capsid-test/busybox:1 "docker-archive:$out/busybox.docker.tar:capsid-test/busybox:1"
buildah push -q capsid-test/busybox:1 "oci:$out/busybox-layout:1"

# A second layer written by umoci: a deleted file and a deleted directory become whiteouts.
cp -a "$out/busybox-layout" "$work/layout"
umoci unpack --rootless --image "$work/layout:1" "$work/bundle" >/dev/null
rm -f "$work/bundle/rootfs/etc/group"
rm -rf "$work/bundle/rootfs/home"
mkdir -p "$work/bundle/rootfs/opt/added" && echo layer2 > "$work/bundle/rootfs/opt/added/file"
umoci repack --image "$work/layout:2" "$work/bundle" >/dev/null
umoci gc --layout "$work/layout"
cp -a "$work/layout" "$out/busybox2-layout"

ctr=$(buildah from scratch)
buildah copy -q "$ctr" "$cache/debian-python3" / >/dev/null
buildah config --cmd '["python3"]' --env LANG=C.UTF-8 "$ctr"
buildah commit -q --rm "$ctr" capsid-test/debian-python3:12 >/dev/null
buildah push -q capsid-test/debian-python3:12 "oci-archive:$out/debian-python3.oci.tar:debian-python3:12"
buildah push -q capsid-test/debian-python3:12 "docker-archive:$out/debian-python3.docker.tar:capsid-test/debian-python3:12"
buildah rmi capsid-test/busybox:1 capsid-test/debian-python3:12 >/dev/null || true
chmod -R a+rX "$out"
touch "$stamp"
echo "$out"
