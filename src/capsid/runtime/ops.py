"""The container's mounts as data: an ordered list of typed operations, and the one
interpreter that carries it out.

:func:`capsid.runtime.plan.make` decides the list once, on the host; :func:`run`
performs it in the session, in order, on ``/final`` (:mod:`capsid.runtime.mounts`),
then reads the environment it calls for off the assembled root; a rank joining a
shared container reads only that environment (:func:`environment`), its root being in
place. The mount points the overlay's upper layer needs are read off the same list
(:func:`points`). Bubblewrap's ``SetupOp`` list is the model. Plain classes with
``__slots__``: this module is on every start's path. Everything the interpreter uses is
imported here, before the session's tmpfs covers ``/tmp`` (where capsid may be installed).
"""

from __future__ import annotations

import os

from capsid import inroot, log
from capsid.runtime import identity, mounts

TYPE_CHECKING = False
if TYPE_CHECKING:

    from capsid.gpu.edits import Edits
    from capsid.mpi.host import HostMPI
    from capsid.runtime.identity import User

LOG = log.get(__name__)


class Op:
    """One step of the container's assembly."""

    __slots__: tuple[str, ...] = ()

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        """Where it mounts in the container: (path, is a directory); host paths under
        *old_root*."""
        return []

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(repr(getattr(self, n)) for n in self.__slots__)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Proc(Op):
    """/proc: a new one for a PID namespace of its own (*new_pid*), else the host's bound;
    with *protect*, the kernel's knobs read-only and what Docker hides hidden."""

    __slots__ = ("new_pid", "protect")

    def __init__(self, new_pid: bool, protect: bool = False) -> None:
        self.new_pid, self.protect = new_pid, protect

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [("/proc", True)]


class Bind(Op):
    """The host's *source* (a real path) on *destination*. A *device* bind keeps device
    access; a bind that is not *required* is skipped where its source is missing."""

    __slots__ = ("destination", "device", "readonly", "required", "source")

    def __init__(self, source: str, destination: str, *, readonly: bool = False,
                 device: bool = False, required: bool = True) -> None:
        self.source, self.destination, self.readonly = source, destination, readonly
        self.device, self.required = device, required

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [(self.destination, os.path.isdir(old_root + self.source))]


class Overlay(Op):
    """The host's directory *source* on *destination*, writable, with its changes kept in
    the host directory *scratch* (``--bind SRC:DST:scratch=DIR``)."""

    __slots__ = ("destination", "scratch", "source")

    def __init__(self, source: str, scratch: str, destination: str) -> None:
        self.source, self.scratch, self.destination = source, scratch, destination

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [(self.destination, True)]


class MinimalDev(Op):
    """A /dev of the container's own: the usual devices, a private devpts, /dev/shm."""

    __slots__ = ()

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [("/dev", True)]


class File(Op):
    """A file of the session's holding *content*, bound over *destination*."""

    __slots__ = ("content", "destination")

    def __init__(self, destination: str, content: bytes) -> None:
        self.destination, self.content = destination, content

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [(self.destination, False)]


class Identity(Op):
    """/etc/passwd and /etc/group: the image's own, with *user* (home at *home*) added."""

    __slots__ = ("home", "user")

    def __init__(self, user: User, home: str) -> None:
        self.user, self.home = user, home

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [("/etc/passwd", False), ("/etc/group", False)]


class OwnDir(Op):
    """An empty writable directory on *destination*: in the session's memory, or as
    *name* in the host's *workdir* (``--workdir``), kept after the container."""

    __slots__ = ("destination", "mode", "name", "workdir")

    def __init__(self, name: str, destination: str, mode: int, workdir: str | None) -> None:
        self.name, self.destination, self.mode, self.workdir = name, destination, mode, workdir

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [(self.destination, True)]


class Target(Op):
    """A directory *destination* that must exist (the home directory, where none is bound)."""

    __slots__ = ("destination",)

    def __init__(self, destination: str) -> None:
        self.destination = destination

    def points(self, old_root: str) -> list[tuple[str, bool]]:
        return [(self.destination, True)]


class Symlink(Op):
    """The symlink *link* → *target* (a CDI ``create-symlinks`` hook)."""

    __slots__ = ("link", "target")

    def __init__(self, target: str, link: str) -> None:
        self.target, self.link = target, link


class CheckMPI(Op):
    """Refuse the host's MPI (``--mpi host``) unless the image's ABI can use it."""

    __slots__ = ("mpi",)

    def __init__(self, mpi: HostMPI) -> None:
        self.mpi = mpi


class Env(Op):
    """Set *name* to *value* in the command's environment; a *pinned* value wins over the
    image's scripts (CDI's), others are like the launcher's own variables."""

    __slots__ = ("name", "pinned", "value")

    def __init__(self, name: str, value: str, pinned: bool = False) -> None:
        self.name, self.value, self.pinned = name, value, pinned


class LibraryPath(Op):
    """LD_LIBRARY_PATH, read off the assembled root: the host MPI's directory
    (*mpi_dir*), the image's own library directories, then the GPU driver's (*gpu*)."""

    __slots__ = ("gpu", "mpi_dir")

    def __init__(self, gpu: Edits | None, mpi_dir: str | None) -> None:
        self.gpu, self.mpi_dir = gpu, mpi_dir


def points(ops: list[Op], old_root: str) -> list[tuple[str, bool]]:
    """Every mount point of *ops*, in order."""
    return [point for op in ops for point in op.points(old_root)]


# -- the interpreter ------------------------------------------------------------------

class Environment:
    """What the plan adds to the command's environment: *extra* like the launcher's own
    variables, *pinned* over the image's scripts."""

    __slots__ = ("extra", "pinned")

    def __init__(self) -> None:
        self.extra: dict[str, str] = {}
        self.pinned: dict[str, str] = {}


def run(ops: list[Op]) -> Environment:
    """Perform every mount of *ops* on /final, then read the environment off it."""
    for op in ops:
        _perform(op)
    return environment(ops, mounts.FINAL, warn=True)


def _perform(op: Op) -> None:
    if isinstance(op, Bind):
        mounts.bind_into(op.source, op.destination, readonly=op.readonly,
                         nodev=not op.device, required=op.required)
    elif isinstance(op, Proc):
        mounts.mount_proc(op.new_pid)
        if op.protect:
            mounts.protect_proc()
    elif isinstance(op, MinimalDev):
        mounts.mount_minimal_dev()
    elif isinstance(op, File):
        mounts.bind_file(op.content, op.destination.strip("/").replace("/", "_"),
                         op.destination)
    elif isinstance(op, Identity):
        passwd = _read_image_file(mounts.FINAL, "/etc/passwd")
        if passwd is None:
            LOG.info("the image has no /etc/passwd; adding one")
        mounts.bind_file(identity.passwd(passwd, op.user, op.home), "passwd", "/etc/passwd")
        mounts.bind_file(identity.group(_read_image_file(mounts.FINAL, "/etc/group"), op.user),
                         "group", "/etc/group")
    elif isinstance(op, OwnDir):
        mounts.own_dir(op.name, op.destination, op.workdir, op.mode)
    elif isinstance(op, Target):
        mounts.ensure_target(mounts.FINAL, op.destination, True)
    elif isinstance(op, Overlay):
        mounts.overlay_into(op.source, op.scratch, op.destination)
    elif isinstance(op, Symlink):
        mounts.symlink_into(op.target, op.link)
    elif isinstance(op, CheckMPI):
        from capsid.mpi import host  # imported with the plan, before pivot_root

        root = os.open(mounts.FINAL, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            host.check(op.mpi, root)
        finally:
            os.close(root)


def environment(ops: list[Op], root: str, *, warn: bool) -> Environment:
    """The variables *ops* set, for a container whose root is *root*."""
    env = Environment()
    for op in ops:
        if isinstance(op, Env):
            (env.pinned if op.pinned else env.extra)[op.name] = op.value
        elif isinstance(op, LibraryPath):
            parts = [op.mpi_dir] if op.mpi_dir else []
            if op.gpu is not None:
                parts += _gpu_library_path(op.gpu, root, warn=warn)
            if parts:
                env.extra["LD_LIBRARY_PATH"] = ":".join(parts)
    return env


def _gpu_library_path(gpu: Edits, root: str, *, warn: bool) -> list[str]:
    """The GPU libraries' directories in the container rooted at *root*: the image's own
    first, the driver's after them (Apptainer 1.5's order). With *warn*, say which
    libraries the image's C library cannot load."""
    from capsid import glibc
    from capsid.gpu import compat

    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        version = glibc.image_glibc(fd)
        dirs = glibc.image_library_dirs(fd) if version is not None else []
    finally:
        os.close(fd)
    if warn:
        compat.warn_unloadable(gpu.library_glibc, version, gpu.option, len(gpu.libraries))
    return dirs + [d for d in gpu.library_dirs if d not in dirs]


def _read_image_file(final: str, path: str) -> bytes | None:
    root = os.open(final, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = inroot.open_file(root, path)
    finally:
        os.close(root)
    if fd is None:
        return None
    with open(fd, "rb", buffering=0) as f:  # unbuffered: no isatty() round trip to FUSE
        return f.read(1 << 24)
