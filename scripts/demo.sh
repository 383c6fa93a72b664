#!/usr/bin/env bash
# capsid's main job, end to end on a built-in example: a definition file on Debian's
# busybox-static → one SIF file (built twice: the second time from the cache) → inspect
# it → list its objects → run in it, as an ordinary user would, with a directory of theirs
# bound in; then a `docker save` archive → SIF → run, a push to and pull from a (local)
# registry, and a Dockerfile built on the pushed image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
capsid=$PWD/.venv/bin/capsid
work=$(mktemp -d "${TMPDIR:-/tmp}/capsid-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
# The recipe: an Apptainer definition file on Debian's busybox-static (no network needed).
mkdir -p "$work/project" && echo "input data" >"$work/project/input.txt"
cat >"$work/project/busybox.def" <<'DEF'
Bootstrap: busybox

%files
    input.txt /opt/demo/input.txt

%post
    adduser -D -H demo && mkdir -p /opt/demo/out && chown demo /opt/demo/out
    echo "built by capsid on $(date -u +%F)" > /opt/demo/built

%environment
    export GREETING="Hello"

%runscript
    echo "$GREETING from $(uname -s) in a capsid container; $(cat /opt/demo/built)"

%labels
    org.capsid.demo busybox
DEF
(cd "$work/project" && step "$capsid" build "$work/busybox.sif" busybox.def)
(cd "$work/project" && step "$capsid" build "$work/busybox.sif" busybox.def --force 2>&1 | tail -3)
scripts/busybox-sandbox.sh "$work/rootfs" >/dev/null
step "$capsid" inspect "$work/busybox.sif"
step "$capsid" inspect --runscript "$work/busybox.sif"
step "$capsid" sif list "$work/busybox.sif"
step "$capsid" build --sandbox "$work/unpacked" "$work/busybox.sif"
mkdir -p "$work/data" && echo "input data" >"$work/data/input.txt"
step "$capsid" run "$work/busybox.sif"
step "$capsid" exec -B "$work/data:/data:ro" "$work/busybox.sif" sh -c 'id -un; cat /data/input.txt'

# The laptop-to-cluster path: an image saved in `docker save` format becomes a SIF and runs;
# then it goes through a registry (a local docker-registry here) and comes back with pull.
umoci init --layout "$work/layout"
umoci new --image "$work/layout:1"
umoci unpack --rootless --image "$work/layout:1" "$work/bundle" >/dev/null 2>&1
cp -a "$work/rootfs/bin" "$work/rootfs/etc" "$work/bundle/rootfs/"
umoci repack --image "$work/layout:1" "$work/bundle"
umoci config --image "$work/layout:1" --config.env GREETING=hello \
    --config.cmd /bin/sh --config.cmd -c --config.cmd 'echo "$GREETING from an OCI image"'
skopeo --insecure-policy copy --quiet "oci:$work/layout:1" \
    "docker-archive:$work/saved.tar:demo/busybox:1"
step "$capsid" build "$work/from-archive.sif" "docker-archive:$work/saved.tar"
step "$capsid" run "$work/from-archive.sif"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '{"version": 0.1, "storage": {"filesystem": {"rootdirectory": "%s"}}, "http": {"addr": "127.0.0.1:%s"}, "log": {"level": "error", "accesslog": {"disabled": true}}}' \
    "$work/registry" "$port" >"$work/registry.yml"
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 & registry=$!
trap 'kill $registry 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
step "$capsid" push --nohttps "$work/from-archive.sif" "docker://127.0.0.1:$port/demo/busybox:1"
step "$capsid" pull --nohttps "$work/pulled.sif" "docker://127.0.0.1:$port/demo/busybox:1"
step "$capsid" exec "$work/pulled.sif" sh -c 'echo "$GREETING, pulled back from a registry"'

# A Dockerfile on the image in the registry: build, run as `docker run` would.
mkdir -p "$work/app" && printf 'echo "args: $*"\n' >"$work/app/hello.sh"
printf 'FROM 127.0.0.1:%s/demo/busybox:1\nCOPY hello.sh /app/\nRUN chmod +x /app/hello.sh\nENTRYPOINT ["/bin/sh", "/app/hello.sh"]\nCMD ["default"]\n' \
    "$port" >"$work/app/Dockerfile"
step "$capsid" build --nohttps "$work/app.sif" "$work/app/Dockerfile"
step "$capsid" run "$work/app.sif"
step "$capsid" run "$work/app.sif" given
echo; echo "demo: done"
