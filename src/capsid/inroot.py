"""Resolving a path inside a container's root, as the container will see it, without leaving it.

Every component is opened relative to the directory before it with ``O_NOFOLLOW``;
symbolic links are read and expanded here, absolute targets restart at the root and
``..`` stops at it, as ``chroot(2)`` (or ``openat2(RESOLVE_IN_ROOT)``) resolves them.
No remainder is ever handed to the kernel to follow, so an image cannot point a
mount point, a created directory or a read at anything outside its root. A chain of
more than :data:`MAX_LINKS` links, or a loop, is refused.

Used on every container start (the read-ahead thread and the mounts), so it imports
only ``os`` and ``stat``.
"""

from __future__ import annotations

import os
import stat

from capsid.errors import RuntimeSetupError

#: Symbolic links followed for one path at most, as the kernel's own limit (ELOOP).
MAX_LINKS = 40

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Unresolvable(RuntimeSetupError):
    """A path inside the image that cannot be resolved (a loop, a file used as a directory)."""


class Walk:
    """Where a path led: the components that exist, each held open, and those that do not.

    ``fds[0]`` is the root; ``fds[i]`` is the component ``trail[i-1]``, opened with
    ``O_PATH``. ``missing`` lists, in order, the components after the last one
    that exists. Close it (or use it as a context manager) when done.
    """

    __slots__ = ("fds", "missing", "owns_root", "trail")

    def __init__(self, root_fd: int, owns_root: bool = False) -> None:
        self.fds = [root_fd]
        self.trail: list[str] = []
        self.missing: list[str] = []
        self.owns_root = owns_root

    @property
    def inside(self) -> str:
        """The path of the last existing component inside the root, free of symlinks."""
        return "/" + "/".join(self.trail)

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def reopen(self, flags: int) -> int:
        """The last existing component opened again with *flags* (never following a link)."""
        if not self.trail:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fds[0])
        return os.open(self.trail[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=self.fds[-2])

    def back_to_root(self) -> None:
        for fd in self.fds[1:]:
            os.close(fd)
        del self.fds[1:]
        self.trail.clear()

    def close(self) -> None:
        self.back_to_root()
        if self.owns_root and self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> Walk:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def walk(root_fd: int, path: str, *, owns_root: bool = False) -> Walk:
    """Resolve *path* under the directory *root_fd*.

    With *owns_root* the walk closes *root_fd* when it is closed, or when this fails.
    """
    result = Walk(root_fd, owns_root)
    todo = _parts(path)[::-1]  # a stack: the next component last
    links = 0
    try:
        while todo:
            part = todo.pop()
            if result.missing:
                # Beyond a component that does not exist there is nothing to follow.
                if part == "..":
                    result.missing.pop()
                else:
                    result.missing.append(part)
                continue
            if part == "..":
                if result.trail:
                    os.close(result.fds.pop())
                    result.trail.pop()
                continue
            try:
                fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=result.fd)
            except FileNotFoundError:
                result.missing.append(part)
                continue
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise Unresolvable(
                        f"{path} in the image: too many levels of symbolic links "
                        f"(a loop, or a chain of more than {MAX_LINKS})",
                        "choose another path inside the container, or fix the image")
                target = os.readlink(part, dir_fd=result.fd)
                if target.startswith("/"):
                    result.back_to_root()
                todo.extend(_parts(target)[::-1])
                continue
            result.fds.append(fd)
            result.trail.append(part)
            if todo and not stat.S_ISDIR(mode):
                raise Unresolvable(f"{path} in the image: {result.inside} is not a directory",
                                   "choose another path inside the container")
    except BaseException:
        result.close()
        raise
    return result


def walk_path(root: str, path: str) -> Walk:
    """:func:`walk` under the directory named *root*."""
    return walk(os.open(root, _DIR), path, owns_root=True)


def open_file(root_fd: int, path: str) -> int | None:
    """*path* inside *root_fd* opened for reading if it exists and is a regular file."""
    try:
        with walk(root_fd, path) as found:
            if found.missing or not found.trail:
                return None
            fd = found.reopen(os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, Unresolvable):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd
