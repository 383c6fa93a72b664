#!/usr/bin/env bash
# Install everything, then run the whole test suite: ruff, mypy, pytest as root (when
# root) and pytest again as an ordinary user, since real users are not root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
scripts/setup.sh

.venv/bin/ruff check src tests bench
.venv/bin/mypy

if [ "$(id -u)" = 0 ]; then
    # The ordinary user the suite runs as again, and (#19) the second user that the root
    # run's cross-user tests plant files and processes as.
    user=${CAPSID_TEST_USER:-capsid-test}
    id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
    export CAPSID_TEST_USER=$user
    CAPSID_TEST_CACHE=$(scripts/debian-image.sh)
    export CAPSID_TEST_CACHE
    scripts/oci-images.sh >/dev/null
    scripts/mpi-image.sh >/dev/null
    scripts/squashfuse-mt.sh >/dev/null   # a multithreaded image server (#22)
    # A fake GPU driver, with device nodes in /dev, and a two-node Slurm cluster: both
    # are taken down again at the end.
    fakegpu=$(scripts/fake-gpu.sh "$CAPSID_TEST_CACHE/fakegpu")
    cleanup() {
        xargs -r rm -f <"$fakegpu/made-devices"
        rmdir /dev/dri 2>/dev/null || true
        scripts/slurm-cluster.sh stop || true
    }
    trap cleanup EXIT
    scripts/slurm-cluster.sh start
    SLURM_CONF=$(scripts/slurm-cluster.sh conf)  # the test cluster's, not /etc/slurm's
    export SLURM_CONF
fi

shared=${CAPSID_SHARED:-$(cd .. && pwd)/shared}
export CAPSID_SHARED=$shared
status=0
.venv/bin/pytest "$@" || status=$?   # 5, "no tests collected", is a failure too

if [ "$(id -u)" = 0 ]; then
    # No admin set-up for the ordinary user: Debian's useradd granted subordinate ids.
    sed -i "/^$user:/d" /etc/subuid /etc/subgid
    # A second user keeps them, for the tests of what builds do with them.
    subuser=${CAPSID_TEST_SUBUSER:-capsid-sub}
    id "$subuser" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$subuser"
    grep -q "^$subuser:" /etc/subuid || echo "$subuser:200000:65536" >>/etc/subuid
    grep -q "^$subuser:" /etc/subgid || echo "$subuser:200000:65536" >>/etc/subgid
    # The ordinary user needs to read the checkout and its venv; copy it if it cannot.
    if ! runuser -u "$user" -- test -r "$repo/pyproject.toml" -a -x "$repo/.venv/bin/python"; then
        copy=/var/tmp/capsid-test-checkout
        rm -rf "$copy" && mkdir -p "$copy"
        cp -a "$repo/." "$copy/" && rm -rf "$copy/.venv"
        (cd "$copy" && scripts/setup.sh)
        chmod -R a+rX "$copy"
        repo=$copy
    fi
    echo "test: running the suite again as the ordinary user $user"
    user_status=0
    runuser -u "$user" -- env -C "$repo" HOME="$(getent passwd "$user" | cut -d: -f6)" \
        CAPSID_SHARED="$shared" CAPSID_TEST_CACHE="$CAPSID_TEST_CACHE" \
        SLURM_CONF="$SLURM_CONF" PATH=/usr/local/bin:/usr/bin:/bin \
        "$repo/.venv/bin/pytest" -p no:cacheprovider "$@" || user_status=$?
    [ "$user_status" = 0 ] || status=$user_status
    # Once more with capsid itself installed under /tmp, which every container's session
    # tmpfs covers: a module imported only after that point cannot be found there (#19).
    echo "test: the runtime's tests again as $user, with capsid installed under /tmp"
    tmp_status=0
    tmpinstall=$(mktemp -d /tmp/capsid-install.XXXXXX)
    /usr/bin/python3 -m venv "$tmpinstall/venv"
    deps=$("$repo/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    own=$("$tmpinstall/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$deps" >"$own/capsid-test-deps.pth"   # pytest and capsid's dependencies
    cp -a "$repo/src/capsid" "$own/capsid"      # what an install puts there: package, scripts
    for script in capsid apptainer singularity run-singularity; do
        sed "1s|^#!.*|#!$tmpinstall/venv/bin/python|" "$repo/bin/$script" >"$tmpinstall/venv/bin/$script"
        chmod 755 "$tmpinstall/venv/bin/$script"
    done
    "$tmpinstall/venv/bin/python" -m compileall -q "$own/capsid" >/dev/null
    chmod -R a+rX "$tmpinstall"
    runuser -u "$user" -- env -C "$repo" HOME="$(getent passwd "$user" | cut -d: -f6)" \
        CAPSID_SHARED="$shared" CAPSID_TEST_CACHE="$CAPSID_TEST_CACHE" \
        PATH=/usr/local/bin:/usr/bin:/bin \
        "$tmpinstall/venv/bin/python" -m pytest -p no:cacheprovider -m "not subids" \
        tests/integration/test_runtime.py tests/integration/test_security.py \
        tests/integration/test_dropin.py tests/integration/test_hostile.py \
        tests/integration/test_build.py || tmp_status=$?
    rm -rf "$tmpinstall"
    [ "$tmp_status" = 0 ] || status=$tmp_status
    echo "test: running the tests of subordinate ids as $subuser"
    sub_status=0
    runuser -u "$subuser" -- env -C "$repo" HOME="$(getent passwd "$subuser" | cut -d: -f6)" \
        CAPSID_SHARED="$shared" CAPSID_TEST_CACHE="$CAPSID_TEST_CACHE" \
        PATH=/usr/local/bin:/usr/bin:/bin \
        "$repo/.venv/bin/pytest" -p no:cacheprovider -m subids "$@" || sub_status=$?
    # a selection given on the command line may hold no test of subordinate ids
    [ "$sub_status" = 5 ] && [ $# -gt 0 ] && sub_status=0
    [ "$sub_status" = 0 ] || status=$sub_status
fi
exit "$status"
