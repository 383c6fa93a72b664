"""Security, round 3 (#19): builds, instances and doctor cross no boundary, whatever the
recipe, the image, a state file or the environment holds — as root and as an ordinary
user. A second user (scripts/test.sh makes ``capsid-test``) plays the attacker where
the suite runs as root; where it runs as that user, root's files stand in for another
user's."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CAPSID, one_error, run_capsid, until_gone, wait_for

pytestmark = pytest.mark.unprivileged

ROOT = os.getuid() == 0


def def_file(directory: Path, base: Path, body: str, name: str = "t.def") -> Path:
    path = directory / name
    path.write_text(f"Bootstrap: localimage\nFrom: {base}\n\n" + textwrap.dedent(body))
    return path


@pytest.fixture
def build_env(tmp_path: Path) -> dict[str, str]:
    """A private cache and home for the builds of one test."""
    home = tmp_path / "home"
    home.mkdir()
    return dict(os.environ, HOME=str(home), CAPSID_CACHEDIR=str(tmp_path / "cache"))


def other_user() -> int | None:
    """A uid that is not the caller's: the test user for root; None for a user."""
    if not ROOT:
        return None
    try:
        return pwd.getpwnam(os.environ.get("CAPSID_TEST_USER", "capsid-test")).pw_uid
    except KeyError:
        return 65534


# -- P1.1: what a step leaves in its scratch directory ----------------------------------

def test_step_outputs_that_link_out_or_block_are_not_read(busybox_sif: Path, tmp_path: Path,
                                                          build_env: dict[str, str]) -> None:
    """A %post that replaces $APPTAINER_ENVIRONMENT with a link to a host file gets
    nothing of it into the image; a FIFO there is one error, not a hang."""
    secret = tmp_path / "secret"
    secret.write_text("export STOLEN=host-secret-4711\n")
    target = "/etc/shadow" if ROOT else str(secret)
    recipe = def_file(tmp_path, busybox_sif, f"""
        %post
            ln -sf {target} $APPTAINER_ENVIRONMENT
            ln -sf {secret} $APPTAINER_LABELS
        """)
    out = tmp_path / "link.sif"
    result = run_capsid("build", out, recipe, env=build_env, timeout=300)
    assert result.returncode == 0, result.stderr
    env91 = run_capsid("exec", out, "cat", "/.singularity.d/env/91-environment.sh",
                       env=build_env).stdout
    labels = run_capsid("inspect", "--labels", out, env=build_env).stdout
    assert "host-secret" not in env91 + labels and "root:" not in env91, env91

    fifo = def_file(tmp_path, busybox_sif, """
        %post
            rm -f $APPTAINER_LABELS; mkfifo $APPTAINER_LABELS
        """, "fifo.def")
    started = time.monotonic()
    result = run_capsid("build", tmp_path / "fifo.sif", fifo, env=build_env, timeout=120)
    assert time.monotonic() - started < 60
    one_error(result, "fifo.def", "APPTAINER_LABELS", "FIFO")
    assert not (tmp_path / "fifo.sif").exists()


# -- P1.2: a build never writes the host --------------------------------------------------

HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/proc/sys/kernel/printk_ratelimit")


@pytest.fixture
def host_state() -> Iterator[dict[str, bytes]]:
    """The host files a hostile step aims at, restored afterwards if a test changed them."""
    before = {}
    for path in HOST_FILES:
        with contextlib.suppress(OSError):
            before[path] = Path(path).read_bytes()
    yield before
    for path, content in before.items():
        if ROOT and Path(path).read_bytes() != content:
            Path(path).write_bytes(content)


def test_a_recipe_cannot_change_the_host(busybox_sif: Path, tmp_path: Path,
                                         build_env: dict[str, str],
                                         host_state: dict[str, bytes]) -> None:
    """RUN steps that write /etc/hosts, /etc/resolv.conf and a sysctl, remount /proc/sys
    read-write, and write /sys leave the host as it was; root's steps are not the host's
    root (they see 65536 ids, the image's), and their own copies of hosts and resolv.conf
    are writable."""
    recipe = def_file(tmp_path, busybox_sif, """
        %post
            cat /proc/self/uid_map > /uid_map
            echo '10.9.9.9 capsid-hostile' >> /etc/hosts && echo hosts >> /wrote
            echo 'nameserver 10.9.9.9' >> /etc/resolv.conf && echo resolv >> /wrote
            echo 77 > /proc/sys/kernel/printk_ratelimit && echo sysctl >> /wrote
            mount -o remount,rw /proc/sys 2>/dev/null && echo remount >> /wrote
            echo 77 > /proc/sys/kernel/printk_ratelimit && echo sysctl2 >> /wrote
            echo 1 > /sys/kernel/mm/ksm/run 2>/dev/null && echo sys >> /wrote
            umount /proc/sys 2>/dev/null && echo umount >> /wrote
            true
        """)
    out = tmp_path / "hostile.sif"
    result = run_capsid("build", out, recipe, env=build_env, timeout=300)
    assert result.returncode == 0, result.stderr
    for path, content in host_state.items():
        assert Path(path).read_bytes() == content, f"the build changed the host's {path}"
    wrote = run_capsid("exec", out, "cat", "/wrote", env=build_env).stdout.split()
    assert wrote == ["hosts", "resolv"], wrote  # the step's own copies only
    uid_map = run_capsid("exec", out, "cat", "/uid_map", env=build_env).stdout.split()
    if ROOT:
        assert uid_map == ["0", "0", "65536"], uid_map
        # the image's files are root's on the host again, not the build range's
        assert out.stat().st_uid == 0
    else:
        assert uid_map[:2] == ["0", "0"], uid_map


@pytest.mark.skipif(not ROOT, reason="the host's root only")
def test_root_build_steps_run_as_an_unused_range(busybox_sif: Path, tmp_path: Path,
                                                 build_env: dict[str, str]) -> None:
    """Seen from the host, root's RUN step is the build range, not uid 0; the build's
    cache belongs to root (its layers' files to the range), the sandbox output to the
    image's owners on the host."""
    from capsid import hostfs

    marker = tmp_path / "step-pid"
    pause = f"3.{os.getpid()}"  # names this test's process among the machine's
    recipe = def_file(tmp_path, busybox_sif, f"""
        %post
            mkdir /owned && touch /owned/f && chown 123:45 /owned/f
            echo $$ > /pid; sleep {pause}
        %setup
            touch {marker}
        """)
    proc = subprocess.Popen([str(CAPSID), "build", "--sandbox", str(tmp_path / "box"),
                             str(recipe)], env=build_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "cmdline").read_bytes() == f"sleep\0{pause}\0".encode():
                        owner = (entry / "status").stat().st_uid
                        # still it, memory and all: an exiting process's entries belong
                        # to root (its cmdline then reads empty)
                        if (entry / "cmdline").read_bytes() == f"sleep\0{pause}\0".encode():
                            seen.add(owner)
                except OSError:
                    pass
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert seen == {hostfs.ROOT_BUILD_IDS[0]}, seen
    owned = (tmp_path / "box" / "owned" / "f").stat()
    assert (owned.st_uid, owned.st_gid) == (123, 45)
    cache = tmp_path / "cache"
    assert cache.stat().st_uid == 0 and (cache / "build-root").stat().st_uid == 0


# -- P1.3: build caches in shared places ----------------------------------------------------

def test_a_build_cache_of_someone_else_is_refused(busybox_sif: Path, tmp_path: Path,
                                                  build_env: dict[str, str]) -> None:
    """A build cache directory another user made (or may write) is never used."""
    recipe = def_file(tmp_path, busybox_sif, "%post\n    touch /x\n")
    uid = other_user()
    if uid is not None:
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o777)
        os.chmod(tmp_path, 0o755)
        os.chown(planted, uid, uid)
        cases = {planted: f"belongs to uid {uid}"}
    else:
        cases = {Path("/etc"): "belongs to uid 0"}
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cases[shared] = "writable by others"
    for directory, words in cases.items():
        before = sorted(p.name for p in directory.iterdir()) if os.access(directory, os.R_OK) \
            else None
        result = run_capsid("build", tmp_path / "x.sif", recipe, timeout=120,
                            env=dict(build_env, CAPSID_BUILD_CACHEDIR=str(directory)))
        one_error(result, str(directory), words)
        if before is not None:
            assert sorted(p.name for p in directory.iterdir()) == before
        assert not (tmp_path / "x.sif").exists()


def test_a_blob_cache_others_can_write_is_refused(hub_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """CAPSID_CACHEDIR pointing at a directory others may write: refused before use."""
    shared = tmp_path / "blobs"
    shared.mkdir()
    shared.chmod(0o777)
    result = run_capsid("pull", tmp_path / "o.sif", "docker://busybox:1",
                        env=dict(hub_env, CAPSID_CACHEDIR=str(shared)), timeout=120)
    one_error(result, str(shared), "writable by others")
    assert list(shared.iterdir()) == [] and not (tmp_path / "o.sif").exists()


def test_the_fallback_build_cache_is_named_for_the_real_user(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Inside a build's user namespace everyone is uid 0: the name of the local build cache
    (used when the cache is on NFS) comes from the uid on the host."""
    from capsid import hostfs
    from capsid.build import store

    monkeypatch.setattr(store, "filesystem_type", lambda _path: "nfs")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("CAPSID_BUILD_CACHEDIR", raising=False)
    monkeypatch.setattr(hostfs, "_REAL_UID", [4242])
    assert store.build_root(tmp_path / "nfs-cache") == tmp_path / "capsid-build-4242"


# -- P1.4: instance records -------------------------------------------------------------------

@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    return runtime


def _records(runtime: Path) -> Path:
    folder = runtime / "capsid" / "instances"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    return folder


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _record(folder: Path, name: str, pid: int, **extra: object) -> Path:
    started = extra.pop("started", None) or _start_time(pid)
    fields = {"name": name, "pid": pid, "image": "/x.sif", "started": started,
              "log_out": "/nonexistent", "log_err": "/nonexistent", "created": 0.0,
              "userns": 4026531837, "mntns": 4026531841, **extra}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(fields))
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_tampered_instance_records_touch_nothing(busybox_sif: Path, tmp_path: Path,
                                                 runtime_dir: Path) -> None:
    """A record cannot make list delete files, start truncate through a link, or stop
    signal a process that is not the instance."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    folder = _records(runtime_dir)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # a dead process whose record names the victim as its log
    _record(folder, "stale", 999999, started=1, log_out=str(victim), log_err=str(victim))
    assert run_capsid("instance", "list", env=env).returncode == 0
    assert victim.read_text() == "precious\n"
    assert not (folder / "stale.json").exists()  # our own stale record goes
    # a live process of ours, not in the recorded namespaces: stop must not touch it
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        _record(folder, "bystander", bystander.pid)
        stop = run_capsid("instance", "stop", "bystander", env=env)
        one_error(stop, "no instance named 'bystander'")
        stop_all = run_capsid("instance", "stop", "--all", env=env)
        assert stop_all.returncode == 0, stop_all.stderr
        assert _alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
    # a link planted where the log goes: start writes a new file, never through the link
    name = f"svc{os.getpid()}"
    os.symlink(victim, folder / "logs" / f"{name}.out")
    started = run_capsid("instance", "start", busybox_sif, name, env=env, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        assert victim.read_text() == "precious\n"
        assert not (folder / "logs" / f"{name}.out").is_symlink()
    finally:
        assert run_capsid("instance", "stop", name, env=env).returncode == 0


def test_records_of_another_user_are_ignored(busybox_sif: Path, tmp_path: Path,
                                             runtime_dir: Path) -> None:
    """A record another user owns is not read, not removed; a runtime directory another
    user owns (root run through su keeps the user's XDG_RUNTIME_DIR) is not used; and
    stop --all with a record naming another user's process stops the caller's own
    instances and says nothing of internal errors."""
    uid = other_user()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir), HOME=str(tmp_path))
    folder = _records(runtime_dir)
    foreign = None
    if uid is not None:
        # another user's process, and a record of theirs in the caller's folder
        foreign = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                    "--clear-groups", "sleep", "300"])
        wait_for(lambda: Path(f"/proc/{foreign.pid}/cmdline").read_bytes().startswith(b"sleep"),
                 "their process started")
        theirs = _record(folder, "theirs", foreign.pid)
        os.chown(theirs, uid, uid)
        # a runtime directory of theirs: ignored, and so its records are
        other_runtime = tmp_path / "their-run"
        _record(_records(other_runtime), "planted", foreign.pid)
        for each in (other_runtime, *other_runtime.rglob("*")):
            os.chown(each, uid, uid)
        listed = run_capsid("instance", "list", "--json",
                            env=dict(env, XDG_RUNTIME_DIR=str(other_runtime)))
        assert listed.returncode == 0 and "planted" not in listed.stdout, listed.stderr
        assert (_records(other_runtime) / "planted.json").exists()
    target = foreign.pid if foreign is not None else 1
    _record(folder, "pid-of-another", target)
    name = f"own{os.getpid()}"
    assert run_capsid("instance", "start", busybox_sif, name, env=env,
                      timeout=60).returncode == 0
    own = json.loads(run_capsid("instance", "list", "--json", env=env).stdout)["instances"]
    assert [i["instance"] for i in own] == [name]
    try:
        stop_all = run_capsid("instance", "stop", "--all", env=env, timeout=60)
        assert stop_all.returncode == 0, stop_all.stderr
        assert "internal error" not in stop_all.stderr
        assert f"instance {name} stopped" in stop_all.stderr
        assert _alive(target)
        if foreign is not None:
            assert (folder / "theirs.json").exists()  # not ours to remove
    finally:
        if foreign is not None:
            foreign.kill()
            foreign.wait()


# -- P2.5, P2.6, P3.11: recipes against the build context ----------------------------------

def test_rw_bind_mount_leaves_the_context_alone(hub_env: dict[str, str],
                                                tmp_path: Path) -> None:
    """RUN --mount=type=bind,rw: the step may write, the context does not change."""
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "keep.txt").write_text("keep\n")
    (context / "Dockerfile").write_text(textwrap.dedent("""\
        FROM busybox:1
        RUN --mount=type=bind,rw,target=/ctx \\
            sh -c 'rm /ctx/keep.txt && echo new > /ctx/new.txt && ls /ctx > /seen'
        """))
    before = sorted(p.name for p in context.iterdir())
    out = tmp_path / "rw.sif"
    result = run_capsid("build", out, context / "Dockerfile", env=hub_env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in context.iterdir()) == before
    assert (context / "keep.txt").read_text() == "keep\n"
    seen = run_capsid("exec", out, "cat", "/seen", env=hub_env).stdout.split()
    assert "new.txt" in seen and "keep.txt" not in seen, seen


@pytest.mark.parametrize("kind", ["link", "unreadable"])
def test_a_hostile_dockerignore(busybox_sif: Path, hub_env: dict[str, str], tmp_path: Path,
                                kind: str) -> None:
    """.dockerignore is read inside the context: a link out of it leads nowhere; an
    unreadable one is one line naming it. Dockerfiles and definition files alike."""
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "data.txt").write_text("data\n")
    if kind == "link":  # rules outside the context that would drop data.txt
        (tmp_path / "outside").write_text("*.txt\n")
        (context / ".dockerignore").symlink_to(tmp_path / "outside")
    else:
        if ROOT:
            pytest.skip("root reads any file")
        (context / ".dockerignore").write_text("*.txt\n")
        (context / ".dockerignore").chmod(0)
    (context / "Dockerfile").write_text("FROM busybox:1\nCOPY data.txt /data.txt\n")
    def_file(context, busybox_sif, "%files\n    data.txt /data.txt\n")
    for recipe in ("Dockerfile", "t.def"):
        result = run_capsid("build", tmp_path / f"{recipe}.sif", context / recipe,
                            env=hub_env, timeout=300)
        if kind == "link":
            assert result.returncode == 0, result.stderr
        else:
            one_error(result, ".dockerignore", "Permission denied")


def test_add_of_a_tar_with_a_dangling_hard_link_names_it(hub_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("dir/copy")
        member.type, member.linkname = tarfile.LNKTYPE, "dir/original"
        tar.addfile(member)
    (tmp_path / "Dockerfile").write_text("FROM busybox:1\nADD bad.tar /x/\n")
    result = run_capsid("build", tmp_path / "o.sif", tmp_path / "Dockerfile", env=hub_env,
                        timeout=300)
    one_error(result, "bad.tar", "dir/copy", "dir/original")


# -- P2.7: doctor reads images as the runtime does --------------------------------------------

def test_doctor_on_hostile_images(busybox_sandbox: Path, tmp_path: Path) -> None:
    """A FIFO as libc.so.6 does not hang doctor; a library linking to a host file does
    not leak that file into the report, for a sandbox and for its SIF."""
    box = tmp_path / "box"
    shutil.copytree(busybox_sandbox, box, symlinks=True)
    secret = tmp_path / "host-file"
    secret.write_bytes(b"CUDA_VERSION 99.9 host-secret-0815\n" + b"\0" * 64)
    lib = box / "usr" / "lib" / "x86_64-linux-gnu"
    lib.mkdir(parents=True, exist_ok=True)
    os.mkfifo(lib / "libc.so.6")
    (lib / "libcudart.so.12.0.0").symlink_to(secret)
    (box / "usr" / "local" / "cuda").mkdir(parents=True)
    (box / "usr" / "local" / "cuda" / "version.json").symlink_to(secret)
    sif = tmp_path / "box.sif"
    assert run_capsid("build", sif, box).returncode == 0
    for image in (box, sif):
        result = run_capsid("doctor", "--json", image, timeout=60)
        assert result.returncode in (0, 1), result.stderr
        assert "host-secret" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


# -- P2.9, P3.10: overlay images ----------------------------------------------------------------

def test_a_damaged_writable_overlay_image_is_one_clear_line(busybox_sif: Path,
                                                            busybox_sandbox: Path,
                                                            tmp_path: Path) -> None:
    """fuse2fs cannot serve a damaged image: one line that says so, on a SIF and on a
    sandbox, with no 'Transport endpoint is not connected'."""
    image = tmp_path / "ov.img"
    assert run_capsid("overlay", "create", "--size", "64", image).returncode == 0
    with open(image, "r+b") as f:
        f.seek(1024)
        f.write(b"\xff" * 48)  # the ext superblock's counts and sizes; its magic stays
    for base in (busybox_sif, busybox_sandbox):
        result = run_capsid("exec", "--overlay", image, base, "true", timeout=60)
        one_error(result, "fuse2fs")
        assert "Transport endpoint" not in result.stderr


def test_a_writable_overlay_image_on_a_sandbox(busybox_sandbox: Path, tmp_path: Path) -> None:
    """The path that imported a module after /tmp was covered (run by the suite under
    /tmp too, see scripts/test.sh)."""
    image = tmp_path / "ov.img"  # for containers run with --fakeroot, as Apptainer's
    assert run_capsid("overlay", "create", "--fakeroot", "--size", "64", image).returncode == 0
    wrote = run_capsid("exec", "--fakeroot", "--overlay", image, busybox_sandbox, "sh", "-c",
                       "echo kept > /kept", timeout=60)
    assert wrote.returncode == 0, wrote.stderr
    before = _fuse2fs()
    read = run_capsid("exec", "--overlay", f"{image}:ro", busybox_sandbox, "cat", "/kept",
                      timeout=60)
    assert read.stdout == "kept\n", read.stderr
    # its server ends with it (as root it waited for itself for ever, stuck in the kernel)
    assert until_gone(lambda: sorted(_fuse2fs() - before)) == []


def _fuse2fs() -> set[str]:
    """This user's fuse2fs processes that have not ended (zombies aside)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or entry.stat().st_uid != os.getuid():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and (entry / "comm").read_text().strip() == "fuse2fs":
                found.add(entry.name)
        except OSError:
            continue
    return found
