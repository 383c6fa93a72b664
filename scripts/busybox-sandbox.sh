#!/bin/sh
# Make a small sandbox (root filesystem directory) from Debian's busybox-static:
# /bin/busybox, a link for each applet, /etc/passwd and /etc/group.
# Usage: scripts/busybox-sandbox.sh DIR
set -eu
dest=${1:?usage: $0 DIR}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "$0: $busybox is missing; apt-get install busybox-static" >&2; exit 1; }
mkdir -p "$dest/bin" "$dest/etc" "$dest/root" "$dest/tmp" "$dest/usr/bin" "$dest/usr/sbin" "$dest/sbin" \
    "$dest/dev" "$dest/proc" "$dest/sys" "$dest/home" "$dest/mnt" "$dest/var/tmp"
touch "$dest/etc/hosts" "$dest/etc/resolv.conf"
cp "$busybox" "$dest/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$dest/bin/$applet" ] || ln -s busybox "$dest/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$dest/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$dest/etc/group"
chmod 1777 "$dest/tmp"
