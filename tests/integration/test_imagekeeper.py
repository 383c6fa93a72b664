"""The image keeper (``image server linger``): a later start of the same image joins the
user namespace and image server an earlier one left, and nothing else is shared.

As an ordinary user every start serves its image through FUSE; root does only with
--fakeroot, so root runs these with it. The suite turns keepers off (conftest) where a
test does not ask for them; these do, each with a runtime directory of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    CAPSID,
    live_squashfuse,
    one_error,
    run_capsid,
    until_gone,
    wait_for,
)

pytestmark = pytest.mark.unprivileged
ROOT = os.geteuid() == 0
AS = ["--fakeroot"] if ROOT else []  #: root serves its images through FUSE only so


@pytest.fixture
def image(busybox_sif: Path, tmp_path: Path) -> Path:
    """A copy of the busybox image of this test's own (its keeper is this test's)."""
    copy = tmp_path / "image.sif"
    shutil.copyfile(busybox_sif, copy)
    return copy


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(run), "CAPSID_IMAGE_LINGER": "30"}


def keepers(image: Path) -> list[str]:
    """Image keepers of this user still running for *image* (their command line is the
    capsid command that started them)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or proc.stat().st_uid != os.getuid():
                continue
            comm = (proc / "comm").read_text().strip()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if comm == "capsid-keeper" and state != "Z" and str(image) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _stop(image: Path) -> None:
    for line in keepers(image) + live_squashfuse(image):
        try:  # noqa: SIM105
            os.kill(int(line.split(":")[0].split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def _no_keeper_left(image: Path):  # type: ignore[no-untyped-def]
    yield
    _stop(image)


def test_a_second_start_joins_the_first_ones_namespace_and_server(
        image: Path, env: dict[str, str], tmp_path: Path) -> None:
    probe = "readlink /proc/self/ns/user; cat /proc/self/uid_map"
    first = run_capsid("exec", *AS, image, "sh", "-c", probe, env=env, check=True)
    assert len(keepers(image)) == 1 and len(live_squashfuse(image)) == 1
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("from the host\n")
    second = run_capsid("exec", *AS, "-B", f"{data}:/data", "--pwd", "/data", image, "sh",
                        "-c", f"{probe}; cat f; pwd", env=env, check=True)
    # The keeper holds the first container's user namespace: its id cannot have been
    # given to another one since, so equal ids are the same namespace.
    assert second.stdout.startswith(first.stdout), (first.stdout, second.stdout)
    assert second.stdout.endswith("from the host\n/data\n")
    assert len(keepers(image)) == 1 and len(live_squashfuse(image)) == 1


def test_containers_of_one_keeper_have_mount_namespaces_of_their_own(
        image: Path, env: dict[str, str], tmp_path: Path) -> None:
    run_capsid("exec", *AS, image, "true", env=env, check=True)  # leaves the keeper
    out = tmp_path / "out"
    out.mkdir()
    script = ("readlink /proc/self/ns/mnt > /out/$1.mnt; echo $1 > /mine; touch /out/$1; "
              "n=0; while [ ! -e /out/a ] || [ ! -e /out/b ]; do sleep 0.05; n=$((n+1)); "
              "[ $n -gt 400 ] && exit 9; done; cat /mine")
    procs = [subprocess.Popen([str(CAPSID), "exec", *AS, "--writable-tmpfs", "-B",
                               f"{out}:/out", str(image), "sh", "-c", script, "sh", name],
                              env=env, stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == ["a\n", "b\n"]  # each its own writable layer
    # read while both ran: the ids belong to two namespaces alive at the same time
    assert (out / "a.mnt").read_text() != (out / "b.mnt").read_text()
    assert len(live_squashfuse(image)) == 1


def test_a_changed_image_is_never_served_by_the_old_keeper(
        busybox_sandbox: Path, env: dict[str, str], tmp_path: Path, image: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(busybox_sandbox, root, symlinks=True)
    built = tmp_path / "built.sif"
    (root / "version").write_text("1\n")
    run_capsid("build", built, root, check=True)
    assert run_capsid("exec", *AS, built, "cat", "/version", env=env).stdout == "1\n"
    (root / "version").write_text("2\n")
    run_capsid("build", "--force", built, root, check=True)  # a new file by that name
    assert run_capsid("exec", *AS, built, "cat", "/version", env=env).stdout == "2\n"
    (root / "version").write_text("3\n")
    rebuilt = tmp_path / "rebuilt.sif"
    run_capsid("build", rebuilt, root, check=True)
    with open(built, "r+b") as f:  # the same file, rewritten in place
        f.write(rebuilt.read_bytes())
        f.truncate()
    assert run_capsid("exec", *AS, built, "cat", "/version", env=env).stdout == "3\n"
    _stop(built)


def test_the_keeper_ends_after_its_linger_and_the_server_with_it(
        image: Path, env: dict[str, str]) -> None:
    env["CAPSID_IMAGE_LINGER"] = "1"
    run_capsid("exec", *AS, image, "true", env=env, check=True)
    assert keepers(image)
    assert until_gone(lambda: keepers(image) + live_squashfuse(image)) == []
    assert not list(Path(env["XDG_RUNTIME_DIR"], "capsid", "images").iterdir())


def test_no_keeper_with_linger_zero(image: Path, env: dict[str, str]) -> None:
    env["CAPSID_IMAGE_LINGER"] = "0"
    run_capsid("exec", *AS, image, "true", env=env, check=True)
    assert keepers(image) == []
    assert until_gone(lambda: live_squashfuse(image)) == []


def test_the_keeper_holds_no_output_of_its_first_container(
        image: Path, env: dict[str, str]) -> None:
    """``capsid exec ... | cat`` ends with the command, not with the keeper 30 s later."""
    start = time.monotonic()
    shown = subprocess.run(f"'{CAPSID}' exec {' '.join(AS)} '{image}' echo hi | cat",
                           shell=True, env=env, capture_output=True, text=True, timeout=60)
    assert shown.stdout == "hi\n" and time.monotonic() - start < 15
    assert keepers(image)


def test_a_killed_server_is_not_joined(image: Path, env: dict[str, str]) -> None:
    run_capsid("exec", *AS, image, "true", env=env, check=True)
    (server,) = live_squashfuse(image)
    os.kill(int(server.split(":")[0].split()[0]), signal.SIGKILL)
    assert until_gone(lambda: keepers(image)) == []
    assert run_capsid("exec", *AS, image, "echo", "ok", env=env).stdout == "ok\n"


def test_concurrent_first_starts_leave_one_keeper_that_answers(
        debian_sif: Path, env: dict[str, str]) -> None:
    """Starts racing to keep the same image: one keeper stays, and it watches its own
    server (not another start's, whose command line is the same and which ends with its
    container)."""
    image = debian_sif  # slow enough a start for eight to overlap
    try:
        procs = [subprocess.Popen([str(CAPSID), "exec", *AS, str(image), "true"], env=env)
                 for _ in range(8)]
        assert [proc.wait(timeout=120) for proc in procs] == [0] * 8
        wait_for(lambda: len(keepers(image)) == 1, "one keeper left")
        time.sleep(1)  # the other starts' servers end now; the keeper must not follow them
        assert len(keepers(image)) == 1 and len(live_squashfuse(image)) == 1
        run_capsid("exec", *AS, image, "true", env=env, check=True)
        assert len(live_squashfuse(image)) == 1  # joined: no server of its own
    finally:
        _stop(image)


def test_a_killed_keeper_is_replaced(image: Path, env: dict[str, str]) -> None:
    run_capsid("exec", *AS, image, "true", env=env, check=True)
    (keeper,) = keepers(image)
    os.kill(int(keeper.split(":")[0]), signal.SIGKILL)
    assert until_gone(lambda: keepers(image)) == []
    sockets = list(Path(env["XDG_RUNTIME_DIR"], "capsid", "images").iterdir())
    assert len(sockets) == 1  # left behind
    assert run_capsid("exec", *AS, image, "echo", "ok", env=env).stdout == "ok\n"
    wait_for(lambda: len(keepers(image)) == 1, "a new keeper")
    assert list(Path(env["XDG_RUNTIME_DIR"], "capsid", "images").iterdir()) == sockets


def test_fakeroot_and_not_do_not_share_a_keeper(image: Path, env: dict[str, str]) -> None:
    ids = "id -u; readlink /proc/self/ns/user"
    plain = run_capsid("exec", image, "sh", "-c", ids, env=env, check=True).stdout.split()
    fake = run_capsid("exec", "--fakeroot", image, "sh", "-c", ids, env=env,
                      check=True).stdout.split()
    assert fake[0] == "0" and plain[0] == str(os.getuid())
    if not ROOT:  # root without --fakeroot mounts with the kernel: no namespace, no keeper
        assert plain[1] != fake[1] and len(keepers(image)) == 2


def test_a_wrong_linger_is_one_error(image: Path, env: dict[str, str], tmp_path: Path) -> None:
    env["CAPSID_IMAGE_LINGER"] = "soon"
    one_error(run_capsid("exec", *AS, image, "true", env=env), "CAPSID_IMAGE_LINGER")
    del env["CAPSID_IMAGE_LINGER"]
    conf = tmp_path / "capsid.conf"
    conf.write_text("image server linger = forever\n")
    one_error(run_capsid("exec", *AS, image, "true", env={**env, "CAPSID_CONFIG": str(conf)}),
              "image server linger")


@pytest.mark.skipif(not ROOT, reason="another user's socket needs root to be made")
def test_a_socket_of_another_user_is_never_trusted() -> None:
    """A keeper's socket that answers as another user gets nothing asked of it, and what it
    sends is not taken (the start then serves the image itself)."""
    user = os.environ.get("CAPSID_TEST_USER", "capsid-test")
    if subprocess.run(["id", "-u", user], capture_output=True).returncode != 0:
        pytest.skip(f"no user {user}")
    base = Path(tempfile.mkdtemp(prefix="capsid-keeper-test-"))
    try:
        base.chmod(0o755)
        folder = base / "run"
        folder.mkdir()
        shutil.chown(folder, user)
        probe = ("import sys; from capsid.runtime import imagekeeper as k; "
                 "p = k.Keeping(b'key', sys.argv[1], 1); print(p.address, flush=True); "
                 "sys.stdin.readline(); print(p.join())")
        asker = subprocess.Popen(["runuser", "-u", user, "--", sys.executable, "-c", probe,
                                  str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert asker.stdout is not None and asker.stdin is not None
        address = asker.stdout.readline().strip()
        impostor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        impostor.bind(address)
        os.chmod(address, 0o777)  # connectable by the user
        impostor.listen(1)
        asked: list[bytes] = []
        connected: list[bool] = []

        def answer() -> None:
            conn, _ = impostor.accept()
            connected.append(True)
            with conn:
                try:
                    fd = os.open("/", os.O_RDONLY)
                    conn.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            fd.to_bytes(4, sys.byteorder) * 2)])
                    asked.append(conn.recv(4096))
                except OSError:
                    pass

        replier = threading.Thread(target=answer, daemon=True)
        replier.start()
        asker.stdin.write("go\n")
        asker.stdin.flush()
        assert asker.stdout.readline().strip() == "None"
        assert asker.wait(timeout=30) == 0
        replier.join(timeout=10)
        assert connected == [True]  # it was asked: by its owner, the answer was refused
        assert not any(asked), asked  # and the key was never sent to it
        impostor.close()
    finally:
        shutil.rmtree(base)


def test_doctor_says_how_long_images_are_kept(image: Path, env: dict[str, str]) -> None:
    def line(linger: str) -> tuple[str, str]:
        doctor = run_capsid("doctor", image, env={**env, "CAPSID_IMAGE_LINGER": linger})
        (found,) = [x for x in doctor.stdout.splitlines() if "image keeper" in x]
        return found, doctor.stdout

    assert line("30")[0].startswith("OK") and "kept served 30 s" in line("30")[0]
    assert line("0")[0].startswith("OK") and "off" in line("0")[0]
    bad, whole = line("soon")
    assert bad.startswith("FAIL") and "CAPSID_IMAGE_LINGER='soon'" in whole
