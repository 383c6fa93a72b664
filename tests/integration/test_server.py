"""The image server: which squashfuse_ll serves a SIF (CAPSID_SQUASHFUSE, the site's
``squashfuse path``, Apptainer's, PATH), what doctor says of it, and that a multithreaded
one (Debian 13's 0.5, unpacked by scripts/squashfuse-mt.sh) serves containers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CAPSID, live_squashfuse, one_error, run_capsid, wait_for

pytestmark = [pytest.mark.unprivileged,
              pytest.mark.skipif(os.geteuid() == 0,
                                 reason="root mounts squashfs with the kernel, not FUSE")]

CACHE = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))


@pytest.fixture(scope="module")
def threaded() -> Path:
    server = CACHE / "squashfuse-mt" / "squashfuse_ll"
    if not os.access(server, os.X_OK):
        pytest.skip("no multithreaded squashfuse_ll (scripts/squashfuse-mt.sh makes one)")
    return server


def _server_of(image: Path, marker: Path, env: dict[str, str]) -> tuple[str, int]:
    """Start a container that waits; the command line and thread count of its server."""
    proc = subprocess.Popen([str(CAPSID), "exec", "-B", f"{marker.parent}:/out", str(image),
                             "sh", "-c", f"ls -R /bin >/dev/null; touch /out/{marker.name}; "
                             "sleep 30"], env=env)
    try:
        wait_for(marker.exists, "the container's command started")
        (found,) = live_squashfuse(image)
        pid = int(found.split(":")[0])
        return found, len(os.listdir(f"/proc/{pid}/task"))
    finally:
        proc.kill()
        proc.wait()


def test_capsid_squashfuse_names_the_server(busybox_sif: Path, tmp_path: Path,
                                            threaded: Path) -> None:
    env = dict(os.environ, CAPSID_SQUASHFUSE=str(threaded))
    result = run_capsid("exec", busybox_sif, "sh", "-c", "ls /bin/sh && echo served", env=env)
    assert (result.returncode, result.stdout) == (0, "/bin/sh\nserved\n"), result.stderr
    cmdline, threads = _server_of(busybox_sif, tmp_path / "up", env)
    assert "squashfuse-mt/root/usr/bin/squashfuse_ll" in cmdline, cmdline
    assert threads > 1  # libfuse's multithreaded loop: a main thread and workers


def test_the_site_names_the_server(busybox_sif: Path, tmp_path: Path,
                                   threaded: Path) -> None:
    conf = tmp_path / "capsid.conf"
    conf.write_text(f"squashfuse path = {threaded}\n")
    env = {k: v for k, v in os.environ.items() if k != "CAPSID_SQUASHFUSE"}
    env["CAPSID_CONFIG"] = str(conf)
    cmdline, _threads = _server_of(busybox_sif, tmp_path / "up", env)
    assert "squashfuse-mt/root/usr/bin/squashfuse_ll" in cmdline, cmdline
    doctor = run_capsid("doctor", busybox_sif, env=env)
    (line,) = [x for x in doctor.stdout.splitlines() if x.split()[1:2] == ["squashfuse_ll"]]
    assert line.startswith("OK") and "0.5" in line and "multithreaded" in line, line


def test_debians_server_is_one_thread_and_doctor_says_so(busybox_sif: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CAPSID_SQUASHFUSE"}
    env["CAPSID_CONFIG"] = "/nonexistent/capsid.conf"
    doctor = run_capsid("doctor", busybox_sif, env=env)
    (line,) = [x for x in doctor.stdout.splitlines() if x.split()[1:2] == ["squashfuse_ll"]]
    version = subprocess.run(["squashfuse_ll", "-V"], capture_output=True, text=True,
                             check=False).stderr
    if version.startswith("squashfuse 0.1"):
        assert line.startswith("WARN") and "one thread" in line, line
        assert "CAPSID_SQUASHFUSE" in doctor.stdout


@pytest.mark.parametrize("where", ["env", "site"])
def test_a_misnamed_server_is_one_error(busybox_sif: Path, tmp_path: Path,
                                        where: str) -> None:
    env = dict(os.environ)
    if where == "env":
        env["CAPSID_SQUASHFUSE"] = str(tmp_path / "missing")
    else:
        env.pop("CAPSID_SQUASHFUSE", None)
        (tmp_path / "capsid.conf").write_text(f"squashfuse path = {tmp_path}\n")
        env["CAPSID_CONFIG"] = str(tmp_path / "capsid.conf")
    result = run_capsid("exec", busybox_sif, "true", env=env)
    one_error(result, "not an executable file", "squashfuse_ll")
