#!/usr/bin/env bash
# A fake GPU driver for the tests, made as root: small libraries named like NVIDIA's
# (one built against a glibc newer than any test image's), an ld.so cache listing and
# an `ldconfig` that prints it, fake nvidia-smi and nvidia-container-cli, a capsid.conf
# that points at them, and device nodes in /dev (no driver needed to bind them).
# Usage: scripts/fake-gpu.sh DIR  (prints DIR; the tests read $CAPSID_TEST_CACHE/fakegpu)
# Device nodes it made are listed in DIR/made-devices, for scripts/test.sh to remove.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD/tests/support/fakegpu
out=${1:?usage: fake-gpu.sh DIR}
rm -rf "$out.new" && mkdir -p "$out.new"/{lib,lib32,bin,stub}
cd "$out.new"
cc=(gcc -shared -fPIC -O2)
"${cc[@]}" -Wl,-soname,libcuda.so.1 -o lib/libcuda.so.535.104.05 "$src/cuda.c"
ln -s libcuda.so.535.104.05 lib/libcuda.so.1
ln -s libcuda.so.1 lib/libcuda.so
"${cc[@]}" -Wl,-soname,libnvidia-ml.so.1 -o lib/libnvidia-ml.so.535.104.05 "$src/nvml.c"
ln -s libnvidia-ml.so.535.104.05 lib/libnvidia-ml.so.1
"${cc[@]}" -nostdlib -Wl,-soname,libc.so.6 -Wl,--version-script="$src/stub-libc.map" \
    -o stub/libc.so.6 "$src/stub-libc.c"
"${cc[@]}" -nostdlib -Wl,-soname,libGLdispatch.so.0 -o lib/libGLdispatch.so.0 \
    "$src/future.c" stub/libc.so.6
# A 32-bit library of the same name: the ELF class tells it apart from ours.
printf '\177ELF\001\001\001\000\000\000\000\000\000\000\000\000\003\000\003\000' \
    >lib32/libcuda.so.1
# A ROCm driver library.
"${cc[@]}" -Wl,-soname,libdrm_amdgpu.so.1 -o lib/libdrm_amdgpu.so.1.0.0 "$src/nvml.c"
ln -s libdrm_amdgpu.so.1.0.0 lib/libdrm_amdgpu.so.1

lib=$out/lib
cat >ldcache.txt <<LIST
5 libs found in cache \`/etc/ld.so.cache'
	libnvidia-ml.so.1 (libc6,x86-64) => $lib/libnvidia-ml.so.1
	libcuda.so.1 (libc6,x86-64) => $lib/libcuda.so.1
	libcuda.so.1 (libc6) => $out/lib32/libcuda.so.1
	libcuda.so (libc6,x86-64) => $lib/libcuda.so
	libGLdispatch.so.0 (libc6,x86-64) => $lib/libGLdispatch.so.0
	libdrm_amdgpu.so.1 (libc6,x86-64) => $lib/libdrm_amdgpu.so.1
	libc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6
LIST
cat >bin/ldconfig <<SH
#!/bin/sh
[ "\$1" = -p ] || { echo "fake ldconfig: only -p" >&2; exit 1; }
cat "$out/ldcache.txt"
SH
cat >bin/nvidia-smi <<'SH'
#!/bin/sh
case "$*" in
    -L) echo "GPU 0: Capsid Fake GPU (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
    *driver_version*) echo "535.104.05" ;;
    *) echo "NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2" ;;
esac
SH
# nvidia-container-cli's part, faked: record the call and put nvidia-smi into the root.
cat >bin/nvidia-container-cli <<SH
#!/bin/sh
for root; do :; done
echo "\$*" >"\$root/nvccli-call"
cp "$out/bin/nvidia-smi" "\$root/usr/bin/nvidia-smi"
SH
cp bin/nvidia-smi bin/rocm-smi
chmod 755 bin/*
printf 'ldconfig path = %s\n' "$out/bin/ldconfig" >capsid.conf

made=()
node() {  # PATH MAJOR MINOR
    [ -e "$1" ] && return 0
    mkdir -p "$(dirname "$1")"
    mknod -m 666 "$1" c "$2" "$3" && made+=("$1")
}
if [ "$(id -u)" = 0 ]; then
    node /dev/nvidia0 195 0
    node /dev/nvidiactl 195 255
    node /dev/kfd 511 0
    node /dev/dri/renderD128 226 128
fi
printf '%s\n' "${made[@]+"${made[@]}"}" >made-devices
chmod -R a+rX .
rm -rf "$out" && mv "$out.new" "$out"
echo "$out"
