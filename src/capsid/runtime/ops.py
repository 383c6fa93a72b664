"""The container's mounts as data: an ordered list of typed operations.

:func:`capsid.runtime.plan.make` decides the list once, on the host; :mod:`capsid.runtime.perform`
carries it out in the session, in order; the mount points the overlay's upper layer
needs are read off the same list (:func:`points`). Bubblewrap's ``SetupOp`` list is the
model. Plain classes with ``__slots__``: this module is on every start's path.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.gpu.edits import Edits
    from capsid.mpi.host import HostMPI
    from capsid.runtime.identity import User


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
