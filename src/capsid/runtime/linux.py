"""The Linux system calls the runtime needs, called through ``_ctypes`` (no compiled helper).

Only what the standard library lacks: ``mount``, ``umount2``, ``pivot_root``,
the new mount API (``fsopen``, ``fsconfig``, ``fsmount``, ``move_mount``),
``unshare`` with error reporting, and ``prctl(PR_SET_NO_NEW_PRIVS)``.

``ctypes`` itself is not imported: its pure-Python layer costs about 3 ms of every
container start, and three C types and one function-pointer class from the
``_ctypes`` extension underneath it are all these calls need.
"""

from __future__ import annotations

import _ctypes
import os

from capsid import arch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

    _Number = _ctypes._SimpleCData[int]
    _Bytes = _ctypes._SimpleCData[bytes | None]
else:
    _Number = _Bytes = _ctypes._SimpleCData


class _Int(_Number):
    _type_ = "i"


class _ULong(_Number):
    _type_ = "L"


class _Long(_Number):
    _type_ = "l"


class _Text(_Bytes):
    """``const char *``: bytes or None."""

    _type_ = "z"


class _Function(_ctypes.CFuncPtr):
    """A C function returning int that saves errno for :func:`_ctypes.get_errno`."""

    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Process:
    """The symbols already loaded in this process (libc): ``dlopen(NULL)``."""

    _handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]


def _libc(name: str, *argtypes: type) -> _Function:
    function = _Function((name, _Process))  # type: ignore[arg-type]
    function.argtypes = argtypes
    return function


_mount = _libc("mount", _Text, _Text, _Text, _ULong, _Text)
_umount2 = _libc("umount2", _Text, _Int)
_unshare = _libc("unshare", _Int)
_setns = _libc("setns", _Int, _Int)
_syncfs = _libc("syncfs", _Int)
_prctl = _libc("prctl", _Int, _ULong, _ULong, _ULong, _ULong)
_prctl_text = _libc("prctl", _Int, _Text, _ULong, _ULong, _ULong)
_sched_getcpu = _libc("sched_getcpu")
_syscall = _libc("syscall", _ULong, _Text, _Text)
# The new mount API (Linux 5.2), by number: glibc before 2.36 has no wrappers.
# Numbers from 424 on are the same on every architecture.
_fsopen = _libc("syscall", _ULong, _Text, _ULong)
_fsconfig = _libc("syscall", _ULong, _ULong, _ULong, _Text, _Text, _ULong)
_fsmount = _libc("syscall", _ULong, _ULong, _ULong, _ULong)
_move_mount = _libc("syscall", _ULong, _Long, _Text, _Long, _Text, _ULong)
_open_tree = _libc("syscall", _ULong, _Long, _Text, _ULong)
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = \
    428, 429, 430, 431, 432

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# the new mount API
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_NOSUID = 2
MOUNT_ATTR_NODEV = 4
MOVE_MOUNT_F_EMPTY_PATH = 4
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000

# clone(2)/unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
# read now: at pivot_root the container's /tmp may hide capsid's own files (an install there)
_SYS_PIVOT_ROOT = getattr(arch.this(), "pivot_root", 155)

# statvfs f_flag bits → mount flags that a bind remount inside a user namespace must keep.
_LOCKED_FLAGS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV,
                 os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME,
                 os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}


def _check(result: int, what: str) -> None:
    if result != 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None), f"mount {target}")


def bind(source: str, target: str, *, readonly: bool = False, recursive: bool = True) -> None:
    """Bind *source* on *target*, always nosuid and nodev, read-only if asked.

    Flags already locked on the source mount (noexec, nosuid, …) are kept on the
    remount, which a user namespace requires.
    """
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    try:
        existing = os.statvfs(target).f_flag
    except OSError:
        existing = 0
    for bit, flag in _LOCKED_FLAGS.items():
        if existing & bit:
            flags |= flag
    mount("none", target, None, flags)


def _checked_fd(result: int, what: str) -> int:
    if result < 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def fs_mount(fstype: str, options: dict[str, str | None], attributes: int) -> int:
    """A new filesystem as a detached mount (fsopen, fsconfig, fsmount): its fd.

    *options* maps each parameter to its value, or to None for a flag. The mount
    belongs to no namespace's tree until :func:`attach` puts it somewhere.
    """
    fs = _checked_fd(_fsopen(_SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen {fstype}")
    try:
        for key, value in options.items():
            if value is None:
                result = _fsconfig(_SYS_FSCONFIG, fs, FSCONFIG_SET_FLAG, key.encode(), None, 0)
            else:
                result = _fsconfig(_SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(),
                                   value.encode(), 0)
            _checked_fd(result, f"fsconfig {key}")
        _checked_fd(_fsconfig(_SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0),
                    f"creating a {fstype} filesystem")
        return _checked_fd(_fsmount(_SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, attributes),
                           f"fsmount {fstype}")
    finally:
        os.close(fs)


def attach(mount_fd: int, target: str) -> None:
    """Attach the detached mount *mount_fd* on *target* (move_mount)."""
    _check(_move_mount(_SYS_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, target.encode(),
                       MOVE_MOUNT_F_EMPTY_PATH), f"move_mount {target}")


def clone_mount(path: str, dir_fd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at *path* (open_tree), to :func:`attach` elsewhere,
    in another mount namespace too. With *dir_fd* and an empty *path*: the mount that
    *dir_fd* (attached in this mount namespace) is open on."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (0 if path else AT_EMPTY_PATH)
    return _checked_fd(_open_tree(_SYS_OPEN_TREE, dir_fd, path.encode(), flags),
                       f"open_tree {path or dir_fd}")


def umount(target: str, flags: int = 0) -> None:
    _check(_umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def namespace_flags(*, pid: bool, ipc: bool, uts: bool, net: bool) -> int:
    """The ``unshare(2)`` flags for a container's mount namespace and the ones asked for."""
    return (CLONE_NEWNS | (CLONE_NEWPID if pid else 0) | (CLONE_NEWIPC if ipc else 0)
            | (CLONE_NEWUTS if uts else 0) | (CLONE_NEWNET if net else 0))


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


def syncfs(fd: int) -> None:
    """Flush the whole file system holding *fd* to disk."""
    _check(_syncfs(fd), "syncfs")


def setns(fd: int, kind: int) -> None:
    """Join the namespace open at *fd* (``/proc/PID/ns/...``) of type *kind* (CLONE_NEW*)."""
    _check(_setns(fd, kind), "setns")


def current_cpu() -> int:
    """The CPU this thread runs on now (-1 if unknown)."""
    return int(_sched_getcpu())


def no_new_privs() -> None:
    """From here on, execve can never grant privileges (setuid bits, file capabilities)."""
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_name(name: str) -> None:
    """Name this process (``ps``, ``top``; 15 bytes at most)."""
    _prctl_text(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def parent_death_signal(signum: int) -> None:
    _check(_prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def write_id_maps(uid_map: str, gid_map: str, pid: str = "self") -> None:
    """Map ids for a fresh user namespace (setgroups must be denied first for gid_map)."""
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


def raise_ambient(caps: tuple[int, ...]) -> bool:
    """Make *caps* (held now, in this user namespace) survive the next execve: they
    become inheritable and ambient. False if the kernel refused."""
    return _set_inheritable(caps) and all(
        _prctl(47, 2, cap, 0, 0) == 0 for cap in caps)  # PR_CAP_AMBIENT_RAISE


def clear_ambient() -> None:
    """Undo :func:`raise_ambient`: no ambient and no inheritable capabilities (the
    container's command inherits none)."""
    _prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    _set_inheritable(None)


def _set_inheritable(caps: tuple[int, ...] | None) -> bool:
    """Add *caps* to the inheritable set, or empty it (None)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
    data = (ctypes.c_uint32 * 6)()  # two of {effective, permitted, inheritable}
    if libc.capget(header, data) != 0:
        return False
    if caps is None:
        data[2] = data[5] = 0
    for cap in caps or ():
        data[2 + 3 * (cap // 32)] |= 1 << (cap % 32)
    return bool(libc.capset(header, data) == 0)


def kernel_version() -> tuple[int, int]:
    """This kernel's (major, minor) version; (0, 0) if it cannot be read."""
    parts = os.uname().release.split(".", 2)
    try:
        return int(parts[0]), int("".join(c for c in parts[1].split("-")[0] if c.isdigit()))
    except (IndexError, ValueError):
        return 0, 0


def start_time(pid: int) -> int | None:
    """When process *pid* started (clock ticks after boot), to tell it from a later
    process given the same id; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


class Namespaces:
    """Process *pid*'s namespaces and root, opened (:func:`open_namespaces`) to be joined
    with :meth:`enter`, as ``nsenter`` does."""

    _FLAGS: ClassVar[dict[str, int]] = {
        "user": CLONE_NEWUSER, "mnt": CLONE_NEWNS, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS,
        "net": CLONE_NEWNET, "pid_for_children": CLONE_NEWPID}

    def __init__(self, fds: dict[str, int], root: int) -> None:
        self.fds, self.root = fds, root

    def enter(self) -> bool:
        """Join them: the mount namespace, and each other one that is not this process's;
        then the root. True if that took a PID namespace, which only this process's
        children enter. Raises OSError; the fds are closed either way."""
        try:
            # Decided first: in its mount namespace, /proc/self may be another PID
            # namespace's /proc, where this process is not.
            differs = {kind: os.fstat(fd).st_ino != os.stat(
                f"/proc/self/ns/{'pid' if kind == 'pid_for_children' else kind}").st_ino
                for kind, fd in self.fds.items()}
            for kind, fd in self.fds.items():  # user first, then mount, then the rest
                if kind == "mnt" or differs[kind]:
                    setns(fd, self._FLAGS[kind])
            os.fchdir(self.root)
            os.chroot(".")
        finally:
            for fd in (*self.fds.values(), self.root):
                os.close(fd)
        return differs.get("pid_for_children", False)


def open_namespaces(pid: int, *, all_kinds: bool = False) -> Namespaces:
    """Open process *pid*'s user and mount namespaces (with *all_kinds*, its IPC, UTS,
    network and PID ones too) and its root. Raises OSError."""
    kinds = ("user", "mnt", *(("ipc", "uts", "net", "pid_for_children") if all_kinds else ()))
    fds: dict[str, int] = {}
    try:
        for kind in kinds:
            fds[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        # O_PATH: no permission asked before the namespaces are joined (a root served
        # by FUSE in the process's user namespace answers nobody outside it)
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        raise
    return Namespaces(fds, root)
