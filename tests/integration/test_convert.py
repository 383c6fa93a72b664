"""sandbox → SIF → sandbox: faithful, deterministic, atomic, with clear errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from capsid.image import meta, sif
from tests.conftest import CAPSID, need, run_capsid, wait_for

pytestmark = pytest.mark.unprivileged


@pytest.fixture
def rich_sandbox(tmp_path: Path, busybox_sandbox: Path) -> Path:
    """A sandbox with the awkward things: setuid bit, hard link, fifo, xattr, odd modes."""
    root = tmp_path / "rich"
    shutil.copytree(busybox_sandbox, root, symlinks=True)
    (root / "opt" / "app").mkdir(parents=True)
    tool = root / "opt" / "app" / "tool"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o4755)
    os.link(tool, root / "opt" / "app" / "tool-hardlink")
    (root / "opt" / "app" / "secret").write_text("x")
    (root / "opt" / "app" / "secret").chmod(0o600)
    (root / "opt" / "ro").mkdir(mode=0o555)
    os.mkfifo(root / "opt" / "app" / "fifo", 0o640)
    (root / "opt" / "app" / "link").symlink_to("../../bin/busybox")
    with contextlib.suppress(OSError):  # not every filesystem takes user xattrs
        os.setxattr(root / "opt" / "app" / "secret", "user.capsid", b"kept")
    (root / ".singularity.d").mkdir()
    (root / ".singularity.d" / "labels.json").write_text('{"maintainer": "hpc team"}')
    (root / ".singularity.d" / "runscript").write_text("#!/bin/sh\necho custom run\n")
    (root / ".singularity.d" / "Singularity").write_text("Bootstrap: scratch\n")
    return root


def _dir_entries(root: Path) -> dict[str, tuple[int, int, int, str]]:
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = ("d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode)
                    else "p" if stat.S_ISFIFO(st.st_mode) else "f")
            entries[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid,
                                                    st.st_gid, kind)
    return entries


def _partition(image: Path, dest: Path) -> Path:
    with sif.SifImage(image) as f:
        part = f.primary_partition()
        assert part is not None
        with open(dest, "wb") as out:
            f.copy_to(part, out)
    return dest


def _squashfs_entries(part: Path) -> dict[str, tuple[int, int, int, str]]:
    stream = subprocess.run(["sqfs2tar", str(part)], capture_output=True, check=True).stdout
    entries = {}
    import io

    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        for m in tar.getmembers():
            kind = "d" if m.isdir() else "l" if m.issym() else "p" if m.isfifo() else "f"
            entries[m.name.rstrip("/")] = (m.mode, m.uid, m.gid, kind)
    return entries


def test_sif_is_read_by_reference_library_as_amd64_primary_squashfs(
        busybox_sif: Path, sifcheck: Path) -> None:
    out = subprocess.run([str(sifcheck), "primary", str(busybox_sif)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:3] == ["Squashfs", "*System", "amd64"] and out[5] == "amd64"
    assert int(out[3]) % 4096 == 0


def test_squashfs_lists_same_paths_modes_and_owners_as_directory(
        rich_sandbox: Path, tmp_path: Path) -> None:
    need("sqfs2tar")
    image = tmp_path / "rich.sif"
    run_capsid("build", image, rich_sandbox, check=True)
    in_dir = _dir_entries(rich_sandbox)
    in_image = _squashfs_entries(_partition(image, tmp_path / "part.sqfs"))
    for path, attrs in in_dir.items():
        assert in_image.get(path) == attrs, path
    added = set(in_image) - set(in_dir)
    assert added <= set(meta.skeleton()), added - set(meta.skeleton())
    # Hard links stay links: both names exist with the same attributes.
    assert in_image["opt/app/tool-hardlink"] == in_image["opt/app/tool"]
    assert in_image["opt/app/tool"][0] == 0o4755


def test_two_builds_of_one_directory_are_identical(rich_sandbox: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.sif", tmp_path / "b.sif"
    run_capsid("build", first, rich_sandbox, check=True)
    time.sleep(1.1)
    run_capsid("build", second, rich_sandbox, check=True)
    assert hashlib.sha256(first.read_bytes()).digest() == \
        hashlib.sha256(second.read_bytes()).digest()


def test_source_date_epoch_sets_the_timestamps(busybox_sandbox: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.sif"
    run_capsid("build", out, busybox_sandbox, check=True,
               env=dict(os.environ, SOURCE_DATE_EPOCH="1700000000"))
    with sif.SifImage(out) as f:
        assert f.header.created_at == 1700000000


@pytest.mark.parametrize(("compression", "code"), [("gzip", 1), ("xz", 4), ("lz4", 5),
                                                   ("zstd", 6)])
def test_compression_choice(busybox_sandbox: Path, tmp_path: Path, compression: str,
                            code: int) -> None:
    out = tmp_path / f"{compression}.sif"
    run_capsid("build", "--compression", compression, out, busybox_sandbox, check=True)
    with sif.SifImage(out) as f:
        part = f.primary_partition()
        assert part is not None
        superblock = f.read(part)[:28]
    assert superblock[:4] == b"hsqs" and int.from_bytes(superblock[20:22], "little") == code


def test_metadata_from_sandbox_reaches_sif_objects_and_inspect(rich_sandbox: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "meta.sif"
    run_capsid("build", out, rich_sandbox, check=True)
    listing = run_capsid("sif", "list", out, check=True).stdout
    assert "|Def.FILE" in listing and "|JSON.Labels" in listing and "|JSON.Generic" in listing
    assert run_capsid("inspect", out, check=True).stdout == "maintainer: hpc team\n"
    assert run_capsid("inspect", "--runscript", out, check=True).stdout == \
        "#!/bin/sh\necho custom run\n"
    assert run_capsid("inspect", "--deffile", out, check=True).stdout == "Bootstrap: scratch\n"
    assert run_capsid("inspect", "--runscript", rich_sandbox, check=True).stdout == \
        "#!/bin/sh\necho custom run\n"


def test_sif_to_sandbox_round_trip(busybox_sif: Path, busybox_sandbox: Path,
                                   tmp_path: Path) -> None:
    out = tmp_path / "unpacked"
    run_capsid("build", "--sandbox", out, busybox_sif, check=True)
    assert (out / "bin" / "busybox").read_bytes() == \
        (busybox_sandbox / "bin" / "busybox").read_bytes()
    assert os.readlink(out / "bin" / "sh") == "busybox"
    assert (out / ".singularity.d" / "actions" / "exec").stat().st_mode & 0o111
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".capsid-tmp")]


def test_device_nodes_a_user_cannot_make_are_left_out_quietly(debian_sif: Path,
                                                              tmp_path: Path) -> None:
    """unsquashfs cannot make /dev/null and its kind for an ordinary user: that is no
    warning per node naming a temporary directory, but one line when asked (-v)."""
    quiet = run_capsid("build", "--sandbox", tmp_path / "quiet", debian_sif, check=True)
    assert quiet.stderr == ""
    told = run_capsid("-v", "build", "--sandbox", tmp_path / "told", debian_sif, check=True)
    left = [line for line in told.stderr.splitlines() if "device nodes" in line]
    if os.geteuid() == 0:
        assert left == [] and (tmp_path / "told" / "dev" / "null").is_char_device()
    else:
        assert len(left) == 1 and "dev/null" in left[0], told.stderr
        assert "capsid-tmp" not in told.stderr
    assert (tmp_path / "told" / "usr" / "bin" / "python3").exists()


def test_existing_target_needs_force(busybox_sandbox: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.sif"
    out.write_text("precious")
    result = run_capsid("build", out, busybox_sandbox)
    assert result.returncode == 255
    assert result.stderr == f"capsid: error: {out} already exists; use --force to overwrite it\n"
    assert out.read_text() == "precious"
    run_capsid("build", "--force", out, busybox_sandbox, check=True)
    assert sif.is_sif(out)


def test_missing_source_directory(tmp_path: Path) -> None:
    result = run_capsid("build", tmp_path / "x.sif", tmp_path / "nowhere")
    assert result.returncode == 255
    assert result.stderr.startswith(f"capsid: error: image {tmp_path}/nowhere does not exist;")
    assert not (tmp_path / "x.sif").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_target_directory(busybox_sandbox: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_capsid("build", locked / "x.sif", busybox_sandbox)
    assert result.returncode == 255
    assert result.stderr == (f"capsid: error: cannot write to directory {locked}: permission "
                             "denied; choose an output path in a directory you can write to\n")


def test_ctrl_c_leaves_no_partial_image(busybox_sandbox: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    shutil.copytree(busybox_sandbox, big, symlinks=True)
    with open(big / "noise", "wb") as f:
        for _ in range(24):
            f.write(os.urandom(8 << 20))
    out = tmp_path / "big.sif"
    # Ctrl-C as a terminal delivers it: not ignored, as it is for a job a script started
    # in the background (a CI runner may be one), which capsid would inherit
    proc = subprocess.Popen([str(CAPSID), "build", str(out), str(big)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupted while it writes: once its temporary output exists
    wait_for(lambda: len(list(tmp_path.iterdir())) > 1, "the build started writing")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "capsid: error: interrupted\n"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def _in_small_filesystem(tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run *command* with {small} a 3 MiB tmpfs (in a user+mount namespace), then list it."""
    need("unshare")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are unavailable")
    small = tmp_path / "small"
    small.mkdir()
    script = (f'mount -t tmpfs -o size=3m none "{small}" && '
              + command.format(small=small) + f'; echo "rc=$?"; ls -A "{small}"')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, check=False)


def test_full_disk_leaves_no_partial_image(busybox_sandbox: Path, tmp_path: Path) -> None:
    """#10.10: the error says the file system is full and where, not 'tar2sqfs: I/O error'."""
    noise = tmp_path / "src"
    shutil.copytree(busybox_sandbox, noise, symlinks=True)
    (noise / "noise").write_bytes(os.urandom(6 << 20))
    done = _in_small_filesystem(tmp_path, f'"{CAPSID}" build "{{small}}/out.sif" "{noise}"')
    assert done.stdout.splitlines() == ["rc=255"], (done.stdout, done.stderr)
    assert done.stderr.startswith(f"capsid: error: the file system of {tmp_path}/small is full")
    assert done.stderr.count("\n") == 1


def test_full_disk_during_a_sandbox_build_leaves_nothing(busybox_sandbox: Path,
                                                         tmp_path: Path) -> None:
    """#10.4: a failed sandbox build left its temporary directory behind."""
    noise = tmp_path / "src"
    shutil.copytree(busybox_sandbox, noise, symlinks=True)
    (noise / "noise").write_bytes(os.urandom(6 << 20))
    image = tmp_path / "noise.sif"
    run_capsid("build", image, noise, check=True)
    done = _in_small_filesystem(tmp_path, f'"{CAPSID}" build --sandbox "{{small}}/sb" "{image}"')
    assert done.stdout.splitlines() == ["rc=255"], (done.stdout, done.stderr)
    assert "is full" in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_force_over_a_sandbox_with_directory_symlinks(busybox_sif: Path, tmp_path: Path) -> None:
    """#10.4: --force over such a sandbox was an internal error (chmod follow_symlinks) and left
    the old sandbox in a temporary directory."""
    out = tmp_path / "sb"
    run_capsid("build", "--sandbox", out, busybox_sif, check=True)
    (out / "linked").symlink_to("/usr")       # directory symlinks, one out of the tree
    (out / "inner").symlink_to("bin")
    (out / "ro").mkdir()
    (out / "ro" / "f").write_text("x")
    (out / "ro").chmod(0o555)                 # and a read-only directory
    result = run_capsid("build", "--force", "--sandbox", out, busybox_sif)
    assert result.returncode == 0, result.stderr
    assert not (out / "linked").exists() and (out / "bin" / "busybox").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sb"]
    assert os.path.isdir("/usr/bin")  # the link's target was not touched


@pytest.mark.parametrize("sandbox", [False, True], ids=["sif", "sandbox"])
def test_kill_9_leftovers_are_removed_by_the_next_build(busybox_sandbox: Path, tmp_path: Path,
                                                        sandbox: bool) -> None:
    """#10.9: kill -9 during a build left .out.*.capsid-tmp files that stayed for ever."""
    big = tmp_path / "big"
    shutil.copytree(busybox_sandbox, big, symlinks=True)
    with open(big / "noise", "wb") as f:
        for _ in range(24):
            f.write(os.urandom(8 << 20))
    source = big
    if sandbox:
        source = tmp_path / "big.sif"
        run_capsid("build", source, big, check=True)
    out = tmp_path / "out"
    argv = [str(CAPSID), "build", *(["--sandbox"] if sandbox else []), str(out), str(source)]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".capsid-tmp")]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    if not sandbox:
        time.sleep(0.3)  # into tar2sqfs's work
    proc.kill()
    proc.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".capsid-tmp")]
    assert left, "the kill came too late to leave anything"
    time.sleep(2.1)  # temporaries younger than 2 s may be a live writer's, about to be locked
    run_capsid("build", *(["--sandbox"] if sandbox else []), tmp_path / "next",
               busybox_sandbox if not sandbox else source, check=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".capsid-tmp")]
    assert not out.exists()
