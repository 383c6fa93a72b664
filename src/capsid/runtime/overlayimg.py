"""Persistent overlay images (``--overlay FILE.img[:ro]``): ext3 files served by fuse2fs.

Apptainer keeps a container's changes in an ext3 image (``overlay create``); without
privileges it serves the image with ``fuse2fs``. capsid does the same with Debian's
fuse2fs, which is built on libfuse 2: that library mounts with ``mount(2)`` itself, so
fuse2fs is started with ``CAP_SYS_ADMIN`` of the user namespace as an ambient
capability (dropped again before the command starts).

- Read-only (``:ro``): fuse2fs mounts the image in a throw-away copy of the container's
  mount namespace, a copy of that mount is attached in the container's, and its
  ``upper/`` is one more lower layer of the kernel overlay. The copy cannot end while
  fuse2fs lives in it, so a small watcher (``tail --pid``, outside the container's
  process tree) stops fuse2fs when the container's process ends (after ``kill -9`` too).
- Writable: kernel overlayfs takes no FUSE upper layer, so ``fuse-overlayfs`` stacks
  ``upper/`` on the image (:func:`serve_writable`), in a throw-away mount namespace
  with fuse2fs under it; its file system is attached to the container detached, and
  both end with the container's namespace.

Writers take an exclusive ``flock`` on the image, readers a shared one; the servers
inherit it, so a second writer is refused until the first container's servers are gone.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

from capsid import tools
from capsid.errors import RuntimeSetupError, UsageError
from capsid.runtime import linux

_EXT_MAGIC_OFFSET = 1080
_EXT_MAGIC = b"\x53\xef"
CAP_SYS_ADMIN = 21
_MOUNT_WAIT_SECONDS = 10.0
#: $1 the process to outlive, then the server's command. The outer shell exits at once,
#: so the server and its watcher are nobody's children here; a server that ends says so,
#: and its watcher goes with it (it must not kill the number later, given to another
#: process). It serves read-only (``:ro``): nothing to write back, so it is killed
#: outright.
_SERVE = ('pid=$1; shift; ( "$@" & f=$!; '
          '( tail -s 0.2 --pid="$pid" -f /dev/null; kill -KILL "$f" ) & w=$!; '
          'wait "$f"; s=$?; kill -KILL "$w" 2>/dev/null; echo "' + '{ended}' + ' $s" >&2 ) '
          '& exit 0')
_ENDED = "capsid: a FUSE server of the overlay ended with status"


def split(spec: str) -> tuple[str, bool]:
    """``PATH[:ro]`` → (path, read-only)."""
    if spec.endswith(":ro"):
        return spec[:-3], True
    if spec.endswith(":rw"):
        return spec[:-3], False
    return spec, False


def is_image(path: str) -> bool:
    """Whether *path* is an overlay image file (not a directory)."""
    return os.path.isfile(path)


def check(path: str, readonly: bool) -> None:
    """Refuse anything but a readable (and, unless *readonly*, writable) ext2/3/4 image."""
    try:
        with open(path, "rb") as f:
            f.seek(_EXT_MAGIC_OFFSET)
            magic = f.read(2)
    except OSError as err:
        raise UsageError(f"cannot read the overlay image {path}: {err.strerror}",
                         "check the path and its permissions") from None
    if magic != _EXT_MAGIC:
        raise UsageError(f"{path} is not an overlay image (no ext3 file system in it)",
                         "make one with 'capsid overlay create --size 1024 FILE.img'")
    if not readonly and not os.access(path, os.W_OK):
        raise UsageError(f"you cannot write to the overlay image {path}",
                         f"use --overlay {path}:ro to read it only")
    if tools.find("fuse2fs") is None:
        raise UsageError("overlay images need fuse2fs", "apt-get install fuse2fs")


def create(path: Path, size_mib: int, *, sparse: bool = False, fakeroot: bool = False,
           force: bool = False, directories: list[str] | None = None) -> None:
    """A new ext3 overlay image of *size_mib* MiB with empty ``upper/`` and ``work/``
    directories owned by the user, as Apptainer's ``overlay create`` makes it; with
    *fakeroot*, owned by root, for containers run with --fakeroot. *directories*
    (absolute paths in the container) are made in ``upper/``, with their parents, as
    the upper directory is: the user may write in them without --fakeroot."""
    from capsid.image import output

    if size_mib < 64:
        raise UsageError(f"--size {size_mib}: an overlay image needs at least 64 MiB",
                         "give --size 64 or more (MiB)")
    made = [_inside(d) for d in directories or []]
    mkfs = tools.which("mkfs.ext3")
    with output.atomic_file(path, force, mode=0o666) as tmp, \
            output.scratch(path, "tree") as scratch:
        os.unlink(scratch)
        os.makedirs(scratch / "upper", 0o755)
        os.makedirs(scratch / "work", 0o755)
        for rel in made:
            os.makedirs(scratch / "upper" / rel, 0o755, exist_ok=True)
        with open(tmp, "wb") as f:
            if sparse:
                f.truncate(size_mib << 20)
            else:
                os.posix_fallocate(f.fileno(), 0, size_mib << 20)
        owner = "0:0" if fakeroot else f"{os.getuid()}:{os.getgid()}"
        argv = [mkfs, "-q", "-F", "-d", str(scratch), "-E", f"root_owner={owner}", str(tmp)]
        if fakeroot and os.getuid() != 0:  # mkfs records owners as it sees them
            argv = [tools.which("unshare"), "--map-root-user", *argv]
        tools.run(argv)  # the scratch tree goes with its context


def _inside(directory: str) -> str:
    """*directory* (``--create-dir``) as a path relative to the container's root."""
    parts = directory.split("/")
    if not directory.startswith("/") or ".." in parts or "\0" in directory:
        raise UsageError(f"--create-dir {directory!r} is not an absolute path in the "
                         "container", "give it as /path/in/the/container, without '..'")
    rel = "/".join(p for p in parts if p not in ("", "."))
    if not rel:
        raise UsageError("--create-dir / names the root, which is yours already",
                         "give a directory below it, such as /var/cache/app")
    return rel


def open_locked(image: str, readonly: bool, patience: float = 3.0) -> int:
    """The image opened and locked: exclusively to write, shared to read (``:ro``).

    The servers of a container that just ended may take a moment to write back and
    let go: a lock held for longer than *patience* seconds is another container's.
    """
    fd = os.open(image, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
        os.close(fd)
        raise RuntimeSetupError(
            f"the overlay image {image} is in use by another container"
            + ("" if readonly else " (only one may write to it at a time)"),
            "wait for it to end, or add :ro to read the image only") from None


def serve(image_fd: int, mountpoint: str, readonly: bool, errors: str) -> None:
    """Mount the image open at *image_fd* (from :func:`open_locked`) on *mountpoint* with
    fuse2fs, until this process ends; *image_fd* is closed.

    Call in the container's user and mount namespaces, before the root is switched
    (fuse2fs and its libraries come from the host). Its messages go to *errors*.
    fuse2fs and its watcher run in a throw-away copy of this mount namespace, and a
    copy of their mount is attached here: the container's ``pivot_root`` later moves
    the root of every process in its namespace, and a watcher still starting then
    would find no ``tail`` or ``/dev/null`` and stop the server at once.
    """
    try:
        options = "fakeroot" + (",ro" if readonly else "")
        argv = [tools.which("fuse2fs"), "-f", "-o", options, f"/proc/self/fd/{image_fd}",
                mountpoint]
        home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.unshare(linux.CLONE_NEWNS)  # the copy: fuse2fs's own mount stays in it
            try:
                _spawn(argv, (image_fd,), mountpoint, errors)
                tree = linux.clone_mount(mountpoint)
            finally:
                linux.setns(home, linux.CLONE_NEWNS)
        finally:
            os.close(home)
        try:
            linux.attach(tree, mountpoint)
        finally:
            os.close(tree)
    except OSError as err:  # no mount namespace of its own, or open_tree (Linux < 5.2)
        raise RuntimeSetupError(f"cannot serve the overlay image: {err.strerror}",
                                "run without --overlay, or on Linux 5.2 or later") from None
    finally:
        os.close(image_fd)


def serve_writable(image_fd: int, lower: str, scratch: str, errors: str) -> int:
    """The writable root of an overlay image on *lower* (the mounted image), as a
    detached mount to attach where the root goes; *image_fd* (locked) is closed.

    Kernel overlayfs takes no FUSE upper layer, so fuse-overlayfs stacks the image's
    ``upper/`` (fuse2fs) on *lower*. Both run in a throw-away copy of this mount
    namespace, never switched to the container's root: fuse-overlayfs resolves paths
    through /proc as it runs. Its file system is created here detached (libfuse 3
    takes ``/dev/fd/N``); when the container's last process ends, the mount goes,
    fuse-overlayfs ends, and the script stops fuse2fs (SIGTERM: it writes back).
    *scratch* is a new directory for fuse2fs's mount point.
    """
    overlayfs = tools.find("fuse-overlayfs")
    if overlayfs is None:
        os.close(image_fd)
        raise RuntimeSetupError("a writable overlay image needs fuse-overlayfs",
                                "apt-get install fuse-overlayfs, or add :ro")
    from capsid.runtime import fuse

    home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.unshare(linux.CLONE_NEWNS)  # the copy: mounts made now stay in it
        os.mkdir(scratch)
        before = os.stat(scratch).st_dev
        fuse_fd = fuse.open_device()
        try:
            mount_fd = linux.fs_mount("fuse", {
                "source": "fuse-overlayfs", "subtype": "fuse-overlayfs", "fd": str(fuse_fd),
                "rootmode": "40000", "user_id": str(os.geteuid()),
                "group_id": str(os.getegid()), "allow_other": None,
                # fuse-overlayfs checks no permission itself (its own mounts ask the
                # kernel to); without this, a plain user could create nothing, even in
                # the directories of the image that are theirs
                "default_permissions": None,
            }, linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV)
            script = ('img=$1 dev=$2 mnt=$3 lower=$4 f2fs=$5 ovl=$6; ( '
                      '"$f2fs" -f -o fakeroot "/proc/self/fd/$img" "$mnt" & f=$!; n=0; '
                      'until mountpoint -q "$mnt"; do sleep 0.01; n=$((n+1)); '
                      '[ $n -gt 1000 ] || ! kill -0 $f 2>/dev/null && break; done; '
                      'if ! mountpoint -q "$mnt"; then kill -TERM $f 2>/dev/null; '
                      'echo "' + _ENDED + ' 1" >&2; exit 1; fi; '
                      '"$ovl" -f -o "lowerdir=$lower,upperdir=$mnt/upper,workdir=$mnt/work,'
                      'noacl,allow_other" "/dev/fd/$dev"; '
                      'echo "' + _ENDED + ' $?" >&2; kill -TERM $f; wait $f ) & exit 0')
            with open(errors, "ab") as err:
                raised = os.geteuid() != 0 and linux.raise_ambient((CAP_SYS_ADMIN,))
                try:
                    subprocess.run([tools.which("sh"), "-c", script, "capsid-overlay",
                                    str(image_fd), str(fuse_fd), scratch, lower,
                                    tools.which("fuse2fs"), overlayfs],
                                   stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                   pass_fds=(image_fd, fuse_fd), start_new_session=True,
                                   check=True)
                finally:
                    if raised:
                        linux.clear_ambient()
            # fuse-overlayfs stacks on fuse2fs: say so now if fuse2fs cannot serve (a
            # damaged image), not later as "Transport endpoint is not connected"
            _wait_mounted(scratch, before, errors, "fuse2fs")
        finally:
            os.close(fuse_fd)
            os.close(image_fd)
        return mount_fd
    finally:
        linux.setns(home, linux.CLONE_NEWNS)
        os.close(home)


def ended(errors: str) -> str | None:
    """How a server of the overlay ended, from its messages in *errors* (its status and
    its last words); None while none has."""
    try:
        with open(errors, "rb") as f:
            said = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    ends = [line for line in lines if line.startswith(_ENDED)]
    if not ends:
        return None
    words = [line for line in lines if not line.startswith(_ENDED)]
    return ends[-1].removeprefix("capsid: ") + (f" after: {words[-1]}" if words else "")


def _spawn(argv: list[str], fds: tuple[int, ...], mountpoint: str, errors: str) -> None:
    """Start FUSE server *argv*, watched, and wait until it has mounted *mountpoint*."""
    command = [tools.which("sh"), "-c", _SERVE.format(ended=_ENDED), "capsid-overlay",
               str(os.getpid()), *argv]
    before = os.stat(mountpoint).st_dev
    with open(errors, "ab") as err:
        raised = os.geteuid() != 0 and linux.raise_ambient((CAP_SYS_ADMIN,))
        try:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                           pass_fds=fds, start_new_session=True, check=True)
        finally:
            if raised:
                linux.clear_ambient()
    _wait_mounted(mountpoint, before, errors, os.path.basename(argv[0]))


def _wait_mounted(mountpoint: str, before: int, errors: str, name: str) -> None:
    deadline = time.monotonic() + _MOUNT_WAIT_SECONDS
    said = ""
    while time.monotonic() < deadline:
        if os.stat(mountpoint).st_dev != before:
            return
        with open(errors, "rb") as f:
            said = f.read().decode(errors="replace").strip()
        if _ENDED in said:
            break
        time.sleep(0.005)
    lines = [line for line in said.splitlines() if _ENDED not in line]
    raise RuntimeSetupError(f"{name} could not serve the overlay image: "
                            f"{lines[-1] if lines else 'it did not start in time'}",
                            "check the image with e2fsck, and that /dev/fuse is usable")
