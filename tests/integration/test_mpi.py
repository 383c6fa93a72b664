"""MPI jobs: mpirun ranks in capsid containers, sharing one container per node.

The image is Debian's Open MPI with tests/support/mpi/mpitest.c (scripts/mpi-image.sh).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CAPSID, barrier, run_capsid

pytestmark = pytest.mark.unprivileged

CACHE = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
#: Open MPI's words for trouble (the CMA warning is often garbled into the second)
TROUBLE = ("WARNING", "ORTE_ERROR_LOG", "different user namespaces", "help message")


def mpirun(*args: str | os.PathLike[str], ranks: int = 4, mca: tuple[str, ...] = (),
           timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=f"{CAPSID.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    command = ["mpirun", "--oversubscribe", "-n", str(ranks), *mca, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False, **kw)  # type: ignore[call-overload, no-any-return]


def _live_servers(image: Path) -> list[int]:
    """squashfuse_ll processes serving *image* that still run (not zombies)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cmdline and cmdline[0].endswith(b"squashfuse_ll") \
                and str(image).encode() in cmdline:
            found.append(int(entry.name))
    return found


def _sockets() -> list[str]:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "capsid" if runtime else Path(f"/tmp/capsid-{os.getuid()}")
    folder = base / "sharens"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _gone(image: Path, before: set[int]) -> str:
    """"" if the job's keeper and image server have gone (they go right after the last
    rank: give them a moment); else what is left, and this user's processes (to tell
    which one keeps them)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        servers, sockets = set(_live_servers(image)) - before, _sockets()
        if not (servers or sockets):
            return ""
        time.sleep(0.05)
    mine = subprocess.run(["ps", "-o", "pid,ppid,stat,args", "-u", str(os.getuid())],
                          capture_output=True, text=True, check=False).stdout
    return f"servers {sorted(servers)}, sockets {sockets}; processes:\n{mine}"


def _clean(output: str) -> None:
    for word in TROUBLE:
        assert word not in output, output


def test_ranks_share_one_container(mpi_sif: Path, tmp_path: Path) -> None:
    before = set(_live_servers(mpi_sif))
    probe = ("readlink /proc/self/ns/user /proc/self/ns/mnt; "
             "ls /proc | while read p; do "
             "tr '\\0' ' ' </proc/$p/cmdline 2>/dev/null "
             "| grep -q '^/usr/bin/squashfuse_ll .*mpi.sif' "
             "&& grep -q '^State:.[^Z]' /proc/$p/status && echo server $p; done; mpitest hello")
    result = mpirun(CAPSID, "exec", mpi_sif, "sh", "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _clean(result.stdout + result.stderr)
    lines = result.stdout.splitlines()
    assert sorted(line for line in lines if line.startswith("rank")) == [
        f"rank {r} of 4 on {os.uname().nodename}" for r in range(4)]
    assert len({line for line in lines if line.startswith("user:")}) == 1
    assert len({line for line in lines if line.startswith("mnt:")}) == 1
    servers = {line for line in lines if line.startswith("server")}
    if os.getuid() != 0:  # root mounts the image with the kernel's squashfs
        assert len(servers - {f"server {p}" for p in before}) == 1  # one per node at peak
    assert not (left := _gone(mpi_sif, before)), left


def test_no_sharens_gives_each_rank_its_own(mpi_sif: Path, tmp_path: Path) -> None:
    result = mpirun(CAPSID, "exec", "--no-sharens", mpi_sif, "sh", "-c", barrier(3),
                    ranks=3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(set(result.stdout.split())) == 3


def test_cma_pingpong_and_exit_codes(mpi_sif: Path, tmp_path: Path) -> None:
    forced = ("--mca", "btl_vader_single_copy_mechanism", "cma")
    result = mpirun(CAPSID, "exec", mpi_sif, "mpitest", "pingpong", "1048576", "20", ranks=2,
                    mca=forced, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _clean(result.stdout + result.stderr)
    assert result.stdout.startswith("pingpong 1048576 ")
    failed = mpirun(CAPSID, "exec", mpi_sif, "mpitest", "exit", "1", "7", ranks=2, cwd=tmp_path)
    assert failed.returncode == 7
    assert "Exit code:    7" in failed.stderr


def test_kill_9_of_every_rank_leaves_nothing(mpi_sif: Path, tmp_path: Path) -> None:
    before = set(_live_servers(mpi_sif))
    marker = tmp_path / "started"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    job = subprocess.Popen(["mpirun", "--oversubscribe", "-n", "3", str(CAPSID), "exec", mpi_sif,
                            "sh", "-c", f"echo $$ >>{marker}; exec sleep 300"],
                           env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while (not marker.exists() or len(marker.read_text().split()) < 3) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 3
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert not (left := _gone(mpi_sif, before)), left


def test_ranks_that_start_and_end_apart(mpi_sif: Path, tmp_path: Path) -> None:
    """--sharens without a launcher: containers started by one parent share."""
    before = set(_live_servers(mpi_sif))
    started = []
    held = -1
    try:
        for pause in (1.0, 1.2, 0.6):
            started.append(subprocess.Popen(
                [str(CAPSID), "exec", "--sharens", str(mpi_sif), "sh", "-c",
                 f"readlink /proc/self/ns/mnt; sleep {pause}"], stdout=subprocess.PIPE,
                text=True, cwd=tmp_path))
            if held < 0:  # the first container's namespace, held open by the test: its
                # number cannot go to a later namespace while the others are compared
                first = started[0].stdout.readline() if started[0].stdout else ""
                held = os.open(f"/proc/{started[0].pid}/ns/mnt", os.O_RDONLY)
                assert os.readlink(f"/proc/self/fd/{held}") == first.strip()
            time.sleep(0.4)
        names = [first.strip()] + [p.communicate(timeout=60)[0].strip() for p in started[1:]]
        started[0].wait(timeout=60)
    finally:
        if held >= 0:
            os.close(held)
        for proc in started:
            proc.kill()
            proc.wait()
    assert all(p.returncode == 0 for p in started)
    assert len(names) == 3 and len(set(names)) == 1, names
    assert not (left := _gone(mpi_sif, before)), left


def test_sharens_with_a_pid_namespace_is_refused_with_a_warning(mpi_sif: Path) -> None:
    result = subprocess.run([str(CAPSID), "exec", "--sharens", "--pid", str(mpi_sif), "true"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "--sharens is ignored" in result.stderr


def test_mpi_host_runs_an_image_without_mpi(mpi_sif: Path, debian_sif: Path,
                                            tmp_path: Path) -> None:
    program = CACHE / "mpitest"  # built on the host, against the host's Open MPI
    no_mpi = run_capsid("exec", debian_sif, "sh", "-c", "ls /usr/lib/x86_64-linux-gnu | "
                        "grep -c libmpi || true")
    assert no_mpi.stdout.strip() == "0"
    bind = ("-B", f"{program}:/opt/mpitest")
    hello = mpirun(CAPSID, "exec", "--mpi", "host", *bind, debian_sif, "/opt/mpitest", "hello",
                   ranks=2, cwd=tmp_path)
    assert hello.returncode == 0, hello.stdout + hello.stderr
    assert sorted(hello.stdout.splitlines()) == [
        f"rank {r} of 2 on {os.uname().nodename}" for r in range(2)]
    _clean(hello.stdout + hello.stderr)
    forced = ("--mca", "btl_vader_single_copy_mechanism", "cma")
    ping = mpirun(CAPSID, "exec", "--mpi", "host", "--cleanenv", *bind, debian_sif,
                  "/opt/mpitest", "pingpong", "1048576", "20", ranks=2, mca=forced, cwd=tmp_path)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.startswith("pingpong 1048576 ")
    # the site's default does the same
    site = tmp_path / "capsid.conf"
    site.write_text("mpi = host\n")
    listed = run_capsid("exec", debian_sif, "sh", "-c", "echo $LD_LIBRARY_PATH; "
                        "ls /.singularity.d/mpi", env={**os.environ, "CAPSID_CONFIG": str(site)})
    lines = listed.stdout.split()
    assert lines[0].startswith("/.singularity.d/mpi:") and "libmpi.so.40" in lines


def _stub_libc(path: Path, newest: str) -> None:
    """A libc.so.6 that defines glibc's symbol versions up to GLIBC_*newest*."""
    need_gcc = shutil.which("gcc")
    if need_gcc is None:
        pytest.skip("needs gcc (scripts/setup.sh installs it)")
    versions = ["2.2.5", "2.3", "2.4", "2.14", "2.17", "2.28", newest]
    script = path.parent / "libc.map"
    script.write_text("".join(f"GLIBC_{v} {{ global: capsid_{v.replace('.', '_')}; }};\n"
                              for v in dict.fromkeys(versions)))
    source = path.parent / "libc.c"
    source.write_text("".join(f"int capsid_{v.replace('.', '_')}(void) {{ return 0; }}\n"
                              for v in dict.fromkeys(versions)))
    subprocess.run(["gcc", "-shared", "-fPIC", "-nostdlib", "-Wl,-soname,libc.so.6",
                    f"-Wl,--version-script={script}", "-o", str(path), str(source)], check=True)


def test_mpi_host_refuses_an_older_glibc(mpi_sif: Path, tmp_path: Path) -> None:
    root = tmp_path / "old-glibc"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    _stub_libc(lib / "libc.so.6", "2.28")
    result = run_capsid("exec", "--mpi", "host", root, "/bin/true")
    assert result.returncode == 255
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "the host's Open MPI" in lines[0] and "needs glibc 2.3" in lines[0]
    assert "the image has glibc 2.28" in lines[0]
    assert "use an image with glibc" in lines[0] and "without --mpi host" in lines[0]


def test_mpi_host_refuses_an_mpich_image(mpi_sif: Path, tmp_path: Path) -> None:
    root = tmp_path / "mpich"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    shutil.copy("/lib/x86_64-linux-gnu/libc.so.6", lib / "libc.so.6")
    (lib / "libmpich.so.12.3.0").write_bytes(b"\x7fELF")
    (lib / "libmpi.so.12").symlink_to("libmpich.so.12.3.0")
    result = run_capsid("exec", "--mpi", "host", root, "/bin/true")
    assert result.returncode == 255
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "the image's MPI is MPICH ABI (libmpi.so.12)" in lines[0]
    assert "the host's is Open MPI" in lines[0] and "(libmpi.so.40)" in lines[0]
    assert "rebuild the program against Open MPI" in lines[0]


def test_mpi_host_without_an_mpi_on_the_host(debian_sif: Path, tmp_path: Path) -> None:
    ldconfig = tmp_path / "ldconfig"
    ldconfig.write_text("#!/bin/sh\necho '0 libs found in cache'\n")
    ldconfig.chmod(0o755)
    site = tmp_path / "capsid.conf"
    site.write_text(f"ldconfig path = {ldconfig}\nmpi prefix = {tmp_path / 'no-mpi'}\n")
    result = run_capsid("exec", "--mpi", "host", debian_sif, "true",
                        env={**os.environ, "CAPSID_CONFIG": str(site)})
    assert result.returncode == 255
    assert "there is no MPI on this host" in result.stderr
    assert "mpi prefix" in result.stderr


def test_a_ranks_pmix_directories_are_bound(mpi_sif: Path, tmp_path: Path) -> None:
    """Slurm keeps a step's PMIx data store in its spool directory and may point TMPDIR at
    a directory of the step's: a rank's container sees both, even with --contain."""
    server, scratch = tmp_path / "spool" / "pmix.7.0", tmp_path / "scratch"
    for each in (server, scratch):
        each.mkdir(parents=True)
        (each / "mark").write_text(each.name + "\n")
    env = dict(os.environ, PMIX_RANK="0", PMIX_NAMESPACE=f"test-{os.getpid()}",
               PMIX_SERVER_TMPDIR=str(server), TMPDIR=str(scratch))
    result = subprocess.run([str(CAPSID), "exec", "--contain", str(mpi_sif), "sh", "-c",
                             'cat "$PMIX_SERVER_TMPDIR/mark" "$TMPDIR/mark"'],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pmix.7.0", "scratch"]
    alone = subprocess.run([str(CAPSID), "exec", "--contain", str(mpi_sif), "ls", str(server)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert alone.returncode != 0  # not a rank: nothing extra is bound


def test_a_shared_container_that_cannot_start_is_one_error(mpi_sif: Path,
                                                           tmp_path: Path) -> None:
    result = subprocess.run([str(CAPSID), "exec", "--sharens", "--overlay",
                             str(tmp_path / "missing"), str(mpi_sif), "true"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 255
    assert result.stderr.splitlines() == [
        f"capsid: error: overlay directory {tmp_path / 'missing'} does not exist; create it "
        f"first (mkdir -p {tmp_path / 'missing'}): changes to the image are kept there"]
    assert _sockets() == []


def test_site_defaults_are_not_for_the_builders_steps(mpi_sif: Path, debian_sif: Path,
                                                      tmp_path: Path) -> None:
    site = tmp_path / "capsid.conf"
    site.write_text("mpi = host\n")
    probe = ("import sys\nfrom capsid.runtime import api\nfrom capsid.runtime.options import "
             "Options\nsys.exit(api.run(sys.argv[1], ['test', '-e', '/.singularity.d/mpi'], "
             "Options(environment={'PATH': '/usr/bin:/bin'}, root_emulation=True, "
             "pid=True)))\n")  # as the builder runs a step
    env = {**os.environ, "CAPSID_CONFIG": str(site)}
    step = subprocess.run([str(CAPSID.parent / "python"), "-c", probe, str(debian_sif)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert step.returncode == 1, step.stderr  # a build step: no host MPI
    user = run_capsid("exec", debian_sif, "test", "-e", "/.singularity.d/mpi", env=env)
    assert user.returncode == 0, user.stderr  # a user's container: the site's default
    site.write_text("mpi = hsot\n")
    bad = run_capsid("exec", debian_sif, "true", env=env)
    assert bad.returncode == 255
    assert bad.stderr.strip() == ("capsid: error: capsid.conf: 'mpi = hsot' is not host or "
                                  "none; fix the site configuration file")


def test_a_socket_name_too_long_runs_a_container_of_its_own(mpi_sif: Path,
                                                            tmp_path: Path) -> None:
    runtime = tmp_path / ("r" * 90)
    runtime.mkdir(mode=0o700)
    result = subprocess.run([str(CAPSID), "exec", "--sharens", str(mpi_sif), "echo", "ran"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert (result.returncode, result.stdout, result.stderr) == (0, "ran\n", "")
