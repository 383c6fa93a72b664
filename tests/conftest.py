"""Shared fixtures: the capsid command, test data from ../shared, a busybox sandbox."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CAPSID_SHARED", REPO.parent / "shared"))
SIF_TESTDATA = SHARED / "testdata" / "sif"
GOLANG_SIF = Path("/usr/share/gocode/src/github.com/sylabs/sif")
CAPSID = Path(sys.executable).parent / "capsid"
# No image keepers (a start's image server kept for the next one) unless a test asks for
# them (tests/integration/test_imagekeeper.py): many tests count the servers left running.
os.environ.setdefault("CAPSID_IMAGE_LINGER", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under unit/ are unit tests; those under integration/ need system tools."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


def run_capsid(*args: str | os.PathLike[str], check: bool = False, **kw: object
               ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(CAPSID), *map(str, args)], capture_output=True, text=True,
                          check=False, **kw)  # type: ignore[call-overload]
    transcript = os.environ.get("CAPSID_TEST_TRANSCRIPT")
    if transcript:  # every command's output, for a grep over a whole run
        with open(transcript, "a") as f:
            f.write(f"$ capsid {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}\n")
    if check and proc.returncode != 0:
        raise AssertionError(f"capsid {args} failed ({proc.returncode}): {proc.stderr}")
    return proc  # type: ignore[no-any-return]


def barrier(count: int, probe: str = "readlink /proc/self/ns/mnt") -> str:
    """A shell command: *probe*, then wait until *count* processes ran it (in the cwd).

    Namespace ids are inode numbers the kernel reuses once a namespace dies: only those
    of processes alive at the same time can be compared, and a rank that waits for the
    others keeps its own alive while theirs are read.
    """
    return (f"{probe}; echo x >> barrier; n=0; "
            f"while [ $(wc -l < barrier) -lt {count} ] && [ $n -lt 1200 ]; do "
            "sleep 0.05; n=$((n+1)); done")


def one_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """A failure reported as exactly one 'capsid: error:' line naming *words*: that line."""
    assert result.returncode == 255, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("capsid: error:")]
    assert len(errors) == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def capsid() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_capsid


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh installs them)")


@pytest.fixture(scope="session")
def shared_sifs() -> Path:
    if not SIF_TESTDATA.is_dir():
        pytest.skip(f"{SIF_TESTDATA} is absent")
    return SIF_TESTDATA


@pytest.fixture(scope="session")
def golang_sif() -> Path:
    if not GOLANG_SIF.is_dir():
        pytest.skip("golang-github-sylabs-sif-dev is not installed")
    return GOLANG_SIF


@pytest.fixture(scope="session")
def busybox_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sandbox made from Debian's busybox-static, shared by the session (do not modify)."""
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    subprocess.run([str(REPO / "scripts" / "busybox-sandbox.sh"), str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def busybox_sif(busybox_sandbox: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("tar2sqfs")
    out = tmp_path_factory.mktemp("images") / "busybox.sif"
    run_capsid("build", out, busybox_sandbox, check=True)
    return out


@pytest.fixture(scope="session")
def sifcheck(tmp_path_factory: pytest.TempPathFactory, golang_sif: Path) -> Path:
    """The reference Go SIF library, built offline into a small reader program."""
    need("go")
    out = tmp_path_factory.mktemp("go")
    src = out / "src"
    shutil.copytree(REPO / "tests" / "golang" / "sifcheck", src)
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOSUMDB="off",
               GOCACHE=str(out / "cache"), GOPATH=str(out / "gopath"), HOME=str(out))
    subprocess.run(["go", "build", "-o", str(out / "sifcheck"), "."], cwd=src, env=env,
                   check=True)
    return out / "sifcheck"


@pytest.fixture(scope="session")
def debian_sif() -> Path:
    """Debian bookworm minbase + python3 as a SIF (made by scripts/debian-image.sh)."""
    cache = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
    image = cache / "debian-python3.sif"
    if not image.is_file():
        pytest.skip(f"{image} is absent: run scripts/debian-image.sh as root (test.sh does)")
    return image


@pytest.fixture(scope="session")
def mpi_sif() -> Path:
    """Debian's Open MPI and tests/support/mpi/mpitest.c as a SIF (scripts/mpi-image.sh)."""
    cache = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
    image = cache / "mpi.sif"
    if not image.is_file() or shutil.which("mpirun") is None:
        pytest.skip(f"{image} or mpirun is absent: scripts/mpi-image.sh makes it as root "
                    "(test.sh does)")
    return image


def live_squashfuse(image: Path | None = None) -> list[str]:
    """squashfuse processes of this user still running (zombies do not count)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if "squashfuse" in cmdline and state != "Z" and (image is None or str(image) in cmdline):
            found.append(f"{proc.name}: {cmdline}")
    return found


def until_gone(probe: Callable[[], list[str]], timeout: float = 15) -> list[str]:
    """Poll *probe* (what is still running) until it finds nothing or *timeout* passes;
    its last answer. Processes end a little after the command that started them: a
    deadline, not a fixed sleep, so a slow machine does not fail and a fast one waits
    no longer than needed."""
    deadline = time.monotonic() + timeout
    while True:
        left = probe()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll until *condition* holds; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def process_identity(pid: int) -> str | None:
    """``PID:start time`` of a live process (zombies are not), which PID reuse cannot
    fake: compare it with the one taken while the process was known to be the right one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else f"{pid}:{fields[19]}"


@pytest.fixture(scope="session")
def oci_images() -> Path:
    """OCI archives and layouts written by buildah/umoci (scripts/oci-images.sh, run as root)."""
    cache = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test")) / "oci"
    if not (cache / ".complete-4").exists():
        pytest.skip("OCI test images are absent (scripts/oci-images.sh makes them as root)")
    return cache


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("openssl")
    from tests.support.registry import make_pki

    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    return d


@pytest.fixture(scope="session")
def registry(pki: Path, oci_images: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A TLS + htpasswd docker-registry holding test/busybox:1, test/debian-python3:12 and,
    under hub/ (the docker.io mirror), library/debian-python3:12, library/busybox:1 and the
    Debian image again as library/python:3.12.0-alpine3.18, busybox as library/alpine;
    all pushed by skopeo."""
    need("docker-registry", "skopeo", "htpasswd")
    from tests.support.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("registry"), pki)
    try:
        reg.skopeo_copy(f"oci-archive:{oci_images}/busybox.oci.tar", "test/busybox:1")
        reg.skopeo_copy(f"oci-archive:{oci_images}/debian-python3.oci.tar",
                        "test/debian-python3:12")
        reg.skopeo_copy(f"oci-archive:{oci_images}/debian-python3.oci.tar",
                        "hub/library/debian-python3:12")
        # The seed's Dockerfile says FROM python:3.12.0-alpine3.18: the mirror serves it.
        reg.skopeo_copy(f"oci-archive:{oci_images}/debian-python3.oci.tar",
                        "hub/library/python:3.12.0-alpine3.18")
        reg.skopeo_copy(f"oci-archive:{oci_images}/busybox.oci.tar", "hub/library/busybox:1")
        # The seed's sandbox demo says docker://alpine: busybox stands in for it.
        reg.skopeo_copy(f"oci-archive:{oci_images}/busybox.oci.tar", "hub/library/alpine:latest")
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def oci_env(tmp_path: Path, pki: Path) -> dict[str, str]:
    """An environment with its own cache, home and config, trusting the test CA."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAPSID_DOCKER", "APPTAINER_DOCKER", "REGISTRY_AUTH",
                                "XDG_CONFIG", "XDG_CACHE"))}
    env.update(HOME=str(home), SSL_CERT_FILE=str(pki / "ca.crt"),
               CAPSID_CACHEDIR=str(tmp_path / "cache"), CAPSID_RETRY_DELAY="0.05",
               CAPSID_REGISTRIES_CONF=str(tmp_path / "registries.conf"))
    return env


@pytest.fixture
def hub_env(registry, oci_env: dict[str, str]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """oci_env with docker.io served by the test registry's mirror, and its credentials."""
    from tests.support.registry import PASSWORD, USER

    Path(oci_env["CAPSID_REGISTRIES_CONF"]).write_text(
        f'[[registry]]\nprefix = "docker.io"\n[[registry.mirror]]\n'
        f'location = "{registry.host}/hub"\n')
    return {**oci_env, "CAPSID_DOCKER_USERNAME": USER, "CAPSID_DOCKER_PASSWORD": PASSWORD}
