"""Host paths that someone else can influence: the one way capsid reads and reuses them.

Two rules, and every host-side access they cover goes through here:

* **Reading** a file that a recipe, an image, a build step, a state file or the
  environment can influence: :func:`read_in` resolves the path inside a root (links
  cannot lead out, see :mod:`capsid.inroot`), opens it non-blocking, accepts a
  regular file only and reads at most a given size. A FIFO cannot hang capsid, a
  symbolic link cannot make it read ``/etc/shadow``, and a huge file cannot fill its
  memory.
* **Reusing a directory** in a place others can write (the build cache, instances,
  shared containers' sockets, the host-MPI cache, the blob cache): :func:`private_dir`
  creates it as the caller's, mode 0700, or accepts an existing one only if it is a
  real directory (not a link), owned by the caller, and not writable by group or
  others. Names come from the real user id, never the id inside a namespace.

Imports only ``os`` and ``stat``: parts of this run on every container start.
"""

from __future__ import annotations

import os
import stat

from capsid.errors import CapsidError

#: More than this many bytes of a file an image or a step controls is refused.
DEFAULT_LIMIT = 1 << 20

#: Owners accepted as "the caller" besides the current uid: inside a root build's user
#: namespace the host's root is seen under another id (see capsid.runtime.userns).
_ALSO_MINE: set[int] = set()
#: The caller's uid on the host, when this process moved into a user namespace where
#: :func:`os.getuid` says something else.
_REAL_UID: list[int] = []
#: Where the host's ids are seen in a root build's namespace (see capsid.runtime.userns).
_HOST_ALIAS: list[int] = []
#: The host ids root's builds run as: ids 0…65535 of the image are these, so that root
#: in a RUN step is not the host's root (as rootful Podman's --userns=auto). Above the
#: ranges useradd and sssd hand out. Files those builds made carry these ids: they are
#: root's own.
ROOT_BUILD_IDS = (2_147_000_000, 65536)


class Refused(CapsidError):
    """A file or directory capsid will not use as it stands."""


def entered_namespace(real_uid: int, host_alias: int | None = None) -> None:
    """Record that this process now runs in a user namespace: *real_uid* is the caller on
    the host, and *host_alias* (if any) where host id 0 is seen here (host id N is
    *host_alias* + N)."""
    _REAL_UID[:] = [real_uid]
    if host_alias is not None:
        _HOST_ALIAS[:] = [host_alias]
        _ALSO_MINE.add(host_alias + real_uid)


def host_alias() -> int | None:
    """Where host id 0 is seen, inside a root build's namespace; else None."""
    return _HOST_ALIAS[0] if _HOST_ALIAS else None


def real_uid() -> int:
    """The caller's uid on the host, for names of per-user places."""
    return _REAL_UID[0] if _REAL_UID else os.getuid()


def owned_by_caller(uid: int) -> bool:
    """Whether files of *uid* are the caller's: its own, or (for the host's root) those
    its builds made, whose owners are root's build range."""
    if uid == os.getuid() or uid in _ALSO_MINE:
        return True
    if os.getuid() == 0 and not _REAL_UID:
        return ROOT_BUILD_IDS[0] <= uid < ROOT_BUILD_IDS[0] + ROOT_BUILD_IDS[1]
    return False


def open_in(root: str | int, path: str, what: str | None = None) -> int | None:
    """*path* inside the directory *root* (a path or an fd), opened read-only and
    non-blocking; None if it does not exist. Anything but a regular file is refused."""
    from capsid import inroot

    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) \
        if isinstance(root, str) else root
    try:
        with inroot.walk(root_fd, path) as found:
            if found.missing:
                return None
            if not found.trail:
                raise Refused(f"{what or path} is a directory", "it must be a regular file")
            fd = found.reopen(os.O_RDONLY | os.O_NONBLOCK)
    except inroot.Unresolvable as err:
        raise Refused(err.message, err.hint) from None
    finally:
        if isinstance(root, str):
            os.close(root_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Refused(f"{what or path} is not a regular file ({_kind(info.st_mode)})",
                      "it must be a regular file")
    return fd


def read_in(root: str | int, path: str, limit: int = DEFAULT_LIMIT,
            what: str | None = None) -> bytes | None:
    """The content of *path* inside *root* (see :func:`open_in`); None if it does not
    exist. More than *limit* bytes is refused."""
    fd = open_in(root, path, what)
    if fd is None:
        return None
    return _read_capped(fd, limit, what or path)


def read_nofollow(path: str, limit: int = DEFAULT_LIMIT, what: str | None = None
                  ) -> bytes | None:
    """A host file named by a state record or the environment: the last component is
    never followed, only a regular file is read, and at most *limit* bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == 40:  # ELOOP: the last component is a link
            raise Refused(f"{what or path} is a symbolic link", "remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Refused(f"{what or path} is not a regular file ({_kind(info.st_mode)})",
                      "remove it")
    return _read_capped(fd, limit, what or path)


def _read_capped(fd: int, limit: int, what: str) -> bytes:
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"{what} is larger than {limit} bytes", "it cannot be this large")
    return data


def check_private(path: str, what: str = "directory") -> None:
    """Refuse *path* unless it is a directory of the caller's that only they can write."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise Refused(f"the {what} {path} is not a directory ({_kind(info.st_mode)})",
                      "remove it, or choose another place")
    if not owned_by_caller(info.st_uid):
        raise Refused(f"the {what} {path} belongs to uid {_as_on_host(info.st_uid)}, "
                      "not to you",
                      "remove it (another user may have made it to tamper with your "
                      "files), or choose another place")
    if info.st_mode & 0o022:
        raise Refused(f"the {what} {path} is writable by others "
                      f"(mode {stat.S_IMODE(info.st_mode):04o})",
                      f"make it private (chmod go-w {path}), or choose another place")


def private_dir(path: str, what: str = "directory", parents: bool = True,
                for_steps: bool = False) -> str:
    """*path* as a directory of the caller's: made (mode 0700) if missing, else checked
    with :func:`check_private`. Missing parents are made too (0700), if *parents*.

    Inside a root build, a new directory is given to the host's root, unless build
    steps write to it (*for_steps*: it stays the build range's root's)."""
    for attempt in (1, 2):
        try:
            os.mkdir(path, 0o700)
            if _HOST_ALIAS and not for_steps:  # the host's root owns it, as ever
                os.chown(path, _HOST_ALIAS[0] + real_uid(), _HOST_ALIAS[0])
        except FileExistsError:
            break
        except FileNotFoundError:
            parent = os.path.dirname(path.rstrip("/"))
            if attempt == 2 or not parents or not parent or parent == path:
                raise
            private_dir(parent, what, parents, for_steps)
        else:
            break
    check_private(path, what)
    return path


def _as_on_host(uid: int) -> int:
    """*uid* as the host knows it (inside a root build, host ids are shifted)."""
    if _HOST_ALIAS and _HOST_ALIAS[0] <= uid < 2 * _HOST_ALIAS[0]:
        return uid - _HOST_ALIAS[0]
    return uid


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a regular file"


def runtime_dir(sub: str, fallback: str) -> str:
    """``$XDG_RUNTIME_DIR/capsid/SUB`` made private, where that directory is the caller's
    (root run through ``su`` keeps the user's, which must not be used); else *fallback*
    made private. Raises :class:`Refused` or :class:`OSError` when neither is safe."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        try:
            check_private(runtime, "runtime directory")
        except (OSError, Refused):
            runtime = None
    base = os.path.join(runtime, "capsid") if runtime else fallback
    private_dir(base, "runtime directory")
    return private_dir(os.path.join(base, sub), "runtime directory", parents=False)
