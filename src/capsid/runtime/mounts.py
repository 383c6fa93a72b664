"""Assembling the container's root inside a private mount namespace.

The session is a tmpfs mounted on ``/tmp`` and then made the root with
``pivot_root``; the host's root stays reachable under ``/oldroot`` until the
final switch. The layout of the session::

    /image     the image's root filesystem (FUSE, kernel squashfs, unpacked, or a sandbox)
    /upper /work   the tmpfs upper layer of the overlay
    /final     overlay of /upper on /image: the container's root, where binds land
    /oldroot   the host's root

Binds are made from ``/oldroot/<source>`` onto ``/final/<destination>``; a missing
destination is created in the overlay's upper layer (or, without an overlay, in a tmpfs
copy of its directory). At the end ``/final``
becomes ``/`` and the session and the host root are detached.
"""

from __future__ import annotations

import errno
import os
import stat

from capsid import inroot, log, tools
from capsid.errors import RuntimeSetupError
from capsid.runtime import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

LOG = log.get(__name__)

SESSION = "/tmp"
OLD = "/oldroot"
FINAL = "/final"
IMAGE = "/image"


def start_session(size_mib: int | None) -> None:
    """Private propagation, then a tmpfs on /tmp holding the session's directories."""
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    data = "mode=0755" + (f",size={size_mib}m" if size_mib else "")
    linux.mount("capsid-session", SESSION, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, data)
    for d in ("image", "final", "upper", "work", "oldroot", "files"):
        os.mkdir(f"{SESSION}/{d}", 0o755)


def enter_session() -> None:
    """Make the session tmpfs the root; the host's root moves to /oldroot."""
    linux.pivot_root(SESSION, SESSION + OLD)
    os.chdir("/")


def mount_kernel_squashfs(fd: int, offset: int) -> None:
    """Mount the squashfs on a loop device (needs real privileges)."""
    tools.run(["mount", "-t", "squashfs", "-o", f"ro,nosuid,nodev,loop,offset={offset}",
               f"/proc/self/fd/{fd}", f"{SESSION}{IMAGE}"], pass_fds=(fd,))


def unpack_image(fd: int, offset: int) -> None:
    """No FUSE and no privileges: unpack the image into a tmpfs of this namespace.

    The tmpfs vanishes with the namespace, so nothing is left on disk, even after kill -9.
    """
    target = f"{SESSION}{IMAGE}"
    linux.mount("capsid-unpacked", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                "mode=0755")
    unsquash(fd, offset, f"{target}/root")
    linux.mount(f"{target}/root", target, None, linux.MS_BIND | linux.MS_REC)


def unsquash(fd: int, offset: int, dest: str) -> None:
    """Unpack the squashfs at *offset* of the image open as *fd* into new directory
    *dest*, as the calling user (what ``--unsquash`` runs)."""
    # status 2: some files could not be made as they were (device nodes): not fatal
    tools.run(["unsquashfs", "-o", str(offset), "-n", "-q", "-f", "-no-xattrs", "-d",
               dest, f"/proc/self/fd/{fd}"], pass_fds=(fd,), ok=(0, 2))


def bind_unpacked(fd: int) -> None:
    """The image unpacked for the job (:mod:`capsid.runtime.unsquashed`), read-only."""
    target = f"{SESSION}{IMAGE}"
    linux.mount(f"/proc/self/fd/{fd}", target, None, linux.MS_BIND | linux.MS_REC)
    linux.mount("none", target, None,
                linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID)


def bind_sandbox(fd: int) -> None:
    linux.mount(f"/proc/self/fd/{fd}", f"{SESSION}{IMAGE}", None, linux.MS_BIND | linux.MS_REC)


def prepare_upper(targets: list[tuple[str, bool]]) -> None:
    """Create missing mount points in the session's upper layer before the overlay exists.

    The upper layer is our own tmpfs, so this works where the image's directory
    belongs to someone else, and costs a mkdir instead of the mounts of a mirror.
    Paths are resolved in the image first, so its symlinks are followed, not shadowed;
    one that cannot be resolved is left to :func:`ensure_target` to report.
    """
    for path, is_dir in targets:
        try:
            with inroot.walk_path(IMAGE, path) as found:
                if not found.missing:
                    continue
                _mkdirs_like(found.inside)
                upper = "/upper" + found.inside.rstrip("/")
                for part in found.missing[:-1]:
                    upper += "/" + part
                    os.makedirs(upper, 0o755, exist_ok=True)
                _create(f"{upper}/{found.missing[-1]}", is_dir)
        except (OSError, inroot.Unresolvable) as err:
            LOG.debug("cannot prepare %s: %s", path, err)


def _mkdirs_like(path: str) -> None:
    """mkdir -p *path* (free of symlinks) in /upper, each with the mode it has in the image."""
    current = ""
    for part in filter(None, path.split("/")):
        current += "/" + part
        upper = f"/upper{current}"
        if os.path.isdir(upper):
            continue
        os.mkdir(upper)
        os.chmod(upper, os.stat(IMAGE + current).st_mode & 0o7777)


def _create(target: str, is_dir: bool) -> None:
    if is_dir:
        os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644))


def open_layers(paths: tuple[str, ...]) -> list[int]:
    """O_PATH fds of a layered root's directories, taken before the session covers /tmp
    (where they may lie); the mounts reach them through /proc/self/fd."""
    fds = []
    for path in paths:
        try:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as err:
            raise RuntimeSetupError(f"cannot open the build layer {path}: {err.strerror}",
                                    "clean the build cache (capsid cache clean) and build "
                                    "again") from None
    return fds


def _by_fd(fd: int) -> str:
    return f"{OLD}/proc/self/fd/{fd}"


def stack(target: str, lowers: Sequence[str], *, links: str, upper: str | None = None,
          work: str | None = None) -> None:
    """The one overlay stacker: *lowers* (directories, newest first) at *target*,
    read-only, or under *upper* receiving every change (*work*: overlayfs's scratch
    directory beside it). The lowers get short names in the directory *links* (relative
    to the cwd, or absolute), which keep the overlay's options within their page.
    """
    os.makedirs(links, exist_ok=True)
    names: list[str] = []
    for lower in lowers:
        name = f"{links}/{len(names)}"
        os.symlink(lower, name)
        names.append(name)
    if upper is None and len(names) == 1:
        linux.bind(names[0], target, readonly=True)
        return
    # read-only without MS_RDONLY: with userxattr and no upper layer, that flag makes
    # overlayfs refuse the mount (Linux 6.18)
    options = "lowerdir=" + ":".join(names) + (
        f",upperdir={upper},workdir={work}" if upper is not None else "")
    try:
        linux.mount("overlay", target, "overlay", linux.MS_NOSUID | linux.MS_NODEV,
                    options + ",userxattr")
    except OSError as err:
        hint = ("the build cache must be on a local file system (ext4, xfs, btrfs, tmpfs); "
                "set CAPSID_CACHEDIR")
        if linux.kernel_version() < (5, 11):
            hint = "overlayfs works in user namespaces from Linux 5.11 on: build on a newer kernel"
        raise RuntimeSetupError(f"cannot stack the build's layers with overlayfs: "
                                f"{err.strerror}", hint) from None


def stack_lowers(lowers: list[int]) -> None:
    """A layered root's read-only directories (fds, newest first), merged at /image (for
    :func:`prepare_upper` to resolve mount points in)."""
    stack(IMAGE, [_by_fd(fd) for fd in lowers], links="/L")


def mount_layers(upper: int, work: int, lowers: list[int]) -> None:
    """/final: the mount points of :func:`prepare_upper` over the *lowers* (fds), with
    *upper* (an fd of a host directory) receiving every change."""
    stack(FINAL, ["/upper", *(_by_fd(fd) for fd in lowers)], links="/F", upper=_by_fd(upper),
          work=_by_fd(work))


def make_root(overlay_upper: str | None, *, userns: bool, writable_image: bool,
              lower: str | None = None, writable_tmpfs: bool = False,
              stack: bool = True) -> None:
    """Build /final: an overlay on the image, or the image itself when it is writable.

    *lower* is a read-only layer above the image (an ``--overlay ...:ro``). Without
    *stack* (the site's ``enable overlay = no``), or where overlayfs cannot stack on the
    image, a read-only image is bound as it is, and :func:`ensure_target` makes mount
    points in tmpfs copies of their directories instead (Apptainer's "underlay"); an
    overlay the user asked for (a directory, an image, ``--writable-tmpfs``) is never
    dropped that way.
    """
    if writable_image:
        linux.bind(IMAGE, FINAL)
        return
    asked = overlay_upper is not None or lower is not None or writable_tmpfs
    if not stack and not asked:
        linux.bind(IMAGE, FINAL, readonly=True)
        return
    upper, work = (f"{overlay_upper}/upper", f"{overlay_upper}/work") if overlay_upper \
        else ("/upper", "/work")
    try:
        for d in (upper, work):
            os.makedirs(d, exist_ok=True)
    except OSError as err:
        raise RuntimeSetupError(f"cannot use the overlay directory {d.removeprefix(OLD)}: "
                                f"{err.strerror}",
                                "give an empty directory of your own") from None
    lowers = f"{lower}:{IMAGE}" if lower else IMAGE
    options = f"lowerdir={lowers},upperdir={upper},workdir={work}" + (
        ",userxattr" if userns else "")
    try:
        linux.mount("overlay", FINAL, "overlay", linux.MS_NOSUID | linux.MS_NODEV, options)
    except OSError as err:
        if overlay_upper:
            raise RuntimeSetupError(f"cannot mount the overlay {overlay_upper.removeprefix(OLD)}: "
                                    f"{err.strerror}",
                                    "the overlay directory must be on a local filesystem "
                                    "(ext4, xfs, tmpfs)") from None
        if asked:
            what = "the overlay image" if lower else "--writable-tmpfs"
            raise RuntimeSetupError(f"kernel overlayfs cannot stack {what} on the image: "
                                    f"{err.strerror}", "run without it, or on Linux 5.11 or "
                                    "later (overlayfs in user namespaces)") from None
        LOG.info("kernel overlayfs cannot stack on the image (%s): mount points are made in "
                 "copies of their directories", err.strerror)
        linux.bind(IMAGE, FINAL, readonly=True)


_mirrors = 0
#: creating a mount point fails so where the directory is the image's own, not ours
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _mirror(directory: str) -> None:
    """Cover *directory* with a tmpfs that we own, holding binds of everything it held.

    This is how a bind destination is made inside a directory of the image that the
    user may not write to (Apptainer's "underlay"): the directory looks the same,
    but new mount points can be created in it.
    """
    global _mirrors
    _mirrors += 1
    stage = f"/files/mirror{_mirrors}"
    os.mkdir(stage)
    mode = os.stat(directory).st_mode & 0o7777
    linux.mount("capsid-mirror", stage, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"mode={mode:o}")
    for entry in os.scandir(directory):
        there, here = entry.path, f"{stage}/{entry.name}"
        if entry.is_symlink():
            os.symlink(os.readlink(there), here)
            continue
        if entry.is_dir():
            os.mkdir(here)
        else:
            with open(here, "w"):
                pass
        try:
            linux.mount(there, here, None, linux.MS_BIND | linux.MS_REC)
        except OSError as err:
            LOG.debug("cannot mirror %s: %s", there, err.strerror)
    linux.mount(stage, directory, None, linux.MS_MOVE)


def _create_in(found: inroot.Walk, is_dir: bool) -> None:
    """Create the missing components of *found*: directories, and a *is_dir* leaf."""
    for index, part in enumerate(found.missing):
        leaf = index == len(found.missing) - 1
        if leaf and not is_dir:
            os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=found.fd))
        else:
            os.mkdir(part, 0o755, dir_fd=found.fd)
        found.fds.append(os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=found.fd))
        found.trail.append(part)
    found.missing.clear()


def ensure_target(root: str, path: str, is_dir: bool, *, required: bool = False) -> str | None:
    """The mount point for *path* under *root*, created if missing.

    The path is resolved inside *root* only (:mod:`capsid.inroot`), and
    whatever is created lies under it. Where that is impossible, a *required* mount
    point raises an error; others are skipped with a warning (None).
    """
    try:
        for attempt in (1, 2):
            with inroot.walk_path(root, path) as found:
                try:
                    _create_in(found, is_dir)
                except OSError as err:
                    if attempt == 2 or err.errno not in _UNWRITABLE:
                        raise
                    _mirror(root + found.inside)  # a directory we may not write to
                    continue
                if stat.S_ISDIR(os.fstat(found.fd).st_mode) != is_dir:
                    kinds = ("a file", "a directory") if is_dir else ("a directory", "a file")
                    raise RuntimeSetupError(
                        f"{path} is {kinds[0]} in the image, and what is bound there is "
                        f"{kinds[1]}", "bind it somewhere else inside the container")
                return root + found.inside
    except (OSError, RuntimeSetupError) as err:
        if required:
            if isinstance(err, RuntimeSetupError):
                raise
            raise RuntimeSetupError(f"cannot create {path} in the container: {err.strerror}",
                                    "bind it somewhere else inside the container") from None
        LOG.warning("skipping %s in the container: %s", path,
                    err.strerror if isinstance(err, OSError) else err.message)
    return None


def bind_into(source: str, destination: str, *, readonly: bool = False, nodev: bool = True,
              required: bool = True) -> bool:
    """Bind host *source* (a real path) onto *destination* in /final."""
    host = OLD + source
    if not os.path.exists(host):
        if required:
            raise RuntimeSetupError(f"bind source {source} does not exist",
                                    "create it or fix the --bind argument")
        return False
    target = ensure_target(FINAL, destination, os.path.isdir(host), required=required)
    if target is None:
        return False
    if nodev:
        linux.bind(host, target, readonly=readonly)
    else:
        linux.mount(host, target, None, linux.MS_BIND | linux.MS_REC)
        if readonly:
            linux.mount("none", target, None,
                        linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID)
    return True


def overlay_into(source: str, scratch: str, destination: str) -> None:
    """Host directory *source* on *destination* in /final, writable, its changes kept in
    host directory *scratch* (overlayfs): *source* itself never changes."""
    target = ensure_target(FINAL, destination, True)
    if target is None:
        return
    name = f"/files/overlay-{len(os.listdir('/files'))}"
    os.mkdir(name)
    for part, path in (("l", f"{OLD}{source}"), ("u", f"{OLD}{scratch}/upper"),
                       ("w", f"{OLD}{scratch}/work")):
        os.symlink(path, f"{name}/{part}")  # short names: paths may hold ',' or ':'
    try:
        linux.mount("overlay", target, "overlay", linux.MS_NOSUID | linux.MS_NODEV,
                    f"lowerdir={name}/l,upperdir={name}/u,workdir={name}/w,userxattr")
    except OSError as err:
        raise RuntimeSetupError(f"cannot mount {source} writable at {destination}: "
                                f"{err.strerror}", "mount it read-only instead") from None


def symlink_into(target: str, link: str) -> None:
    """Create the symlink *link* → *target* in /final (a CDI ``create-symlinks`` hook)."""
    parent, name = os.path.split(link)
    for attempt in (1, 2):
        directory = ensure_target(FINAL, parent, True, required=False)
        if directory is None:
            return
        try:
            os.symlink(target, f"{directory}/{name}")
        except FileExistsError:
            return
        except OSError as err:
            if attempt == 1 and err.errno in _UNWRITABLE:
                _mirror(directory)  # a directory of the image we may not write to
                continue
            LOG.warning("cannot create the symlink %s in the container: %s", link,
                        err.strerror)
        return


def bind_file(content: bytes, name: str, destination: str) -> None:
    """Write *content* into the session and bind it over *destination* in /final."""
    path = f"/files/{name}"
    with open(path, "wb") as f:
        f.write(content)
    target = ensure_target(FINAL, destination, is_dir=False)
    if target is not None:
        linux.bind(path, target)


def own_dir(name: str, destination: str, workdir: str | None, mode: int) -> None:
    """An empty writable directory *name* on *destination* in /final: in the session's
    memory (gone with the container), or in --workdir *workdir* on the host (kept)."""
    if workdir is not None:  # on the host, kept after the container
        path = f"{OLD}{os.path.realpath(workdir)}/{name}"
        os.makedirs(path, exist_ok=True)
    else:
        path = f"/files/{name}"
        os.mkdir(path)
        os.chmod(path, mode)
    target = ensure_target(FINAL, destination, is_dir=True, required=False)
    if target is not None:
        linux.bind(path, target)


def mount_proc(new_pid_namespace: bool) -> None:
    target = ensure_target(FINAL, "/proc", True)
    if target is None:
        return
    if new_pid_namespace:
        linux.mount("proc", target, "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    else:
        linux.mount(f"{OLD}/proc", target, None, linux.MS_BIND | linux.MS_REC)


#: Parts of /proc that set the kernel's behaviour for the whole machine: read-only in
#: build steps, as Docker makes them for every container.
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
#: Parts of /proc that tell about the whole machine's memory and keys: hidden.
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug")


def protect_proc() -> None:
    """Make the kernel's knobs under the new /proc read-only and hide what Docker hides."""
    target = f"{FINAL}/proc"
    for name in PROC_READONLY:
        if os.path.exists(f"{target}/{name}"):
            linux.bind(f"{target}/{name}", f"{target}/{name}", readonly=True)
    for name in PROC_MASKED:
        if os.path.isfile(f"{target}/{name}") and os.path.exists(f"{OLD}/dev/null"):
            linux.mount(f"{OLD}/dev/null", f"{target}/{name}", None, linux.MS_BIND)


def mount_minimal_dev() -> None:
    """--contain: a tmpfs /dev with the usual devices, a private devpts and /dev/shm."""
    target = ensure_target(FINAL, "/dev", True)
    if target is None:
        return
    linux.mount("capsid-dev", target, "tmpfs", linux.MS_NOSUID, "mode=0755")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"{OLD}/dev/{name}"):
            with open(f"{target}/{name}", "w"):
                pass
            linux.mount(f"{OLD}/dev/{name}", f"{target}/{name}", None, linux.MS_BIND)
    for d in ("pts", "shm", "mqueue"):
        os.mkdir(f"{target}/{d}")
    try:
        linux.mount("devpts", f"{target}/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                    "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", f"{target}/ptmx")
    except OSError as err:
        LOG.debug("no private devpts: %s", err.strerror)
    linux.mount("shm", f"{target}/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(link, f"{target}/{name}")


def finish(readonly_root: bool) -> None:
    """Seal /final and make it the root; the session and the host root are detached."""
    if readonly_root:
        try:
            linux.mount("none", FINAL, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                        | linux.MS_NOSUID | linux.MS_NODEV)
        except OSError as err:
            LOG.debug("could not make the root read-only: %s", err.strerror)
    os.chdir(FINAL)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")
