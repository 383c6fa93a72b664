"""A step's directory as an OCI layer: a tar stream with whiteouts, generated as it is read.

overlayfs records a deletion as a 0/0 character device and a replaced directory as
one marked ``user.overlay.opaque``; the OCI image spec says ``.wh.NAME`` and
``.wh..wh..opq``. Owners are kept, except that the builder's own files (the user,
who is root inside) are root's; entries are sorted, and with *mtime* every
timestamp is that one, so the same directory gives the same bytes.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_CHUNK = 1 << 20
_OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")


def _opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _header(name: str, info: os.stat_result, mtime: int | None, **fields: object) -> bytes:
    entry = tarfile.TarInfo(name)
    entry.mode = stat.S_IMODE(info.st_mode)
    entry.uid = 0 if info.st_uid == os.geteuid() else info.st_uid  # the builder: root
    entry.gid = 0 if info.st_gid == os.getegid() else info.st_gid
    entry.uname = "root" if entry.uid == 0 else ""
    entry.gname = "root" if entry.gid == 0 else ""
    entry.mtime = mtime if mtime is not None else int(info.st_mtime)
    for key, value in fields.items():
        setattr(entry, key, value)
    return entry.tobuf(tarfile.PAX_FORMAT)


def chunks(root: str, mtime: int | None = None) -> Iterator[bytes]:
    """The tar stream of directory *root* (an overlayfs upper or a plain tree)."""
    links: dict[tuple[int, int], str] = {}

    def walk(directory: str, prefix: str) -> Iterator[bytes]:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            rel = f"{prefix}{name}"
            info = os.lstat(path)
            mode = info.st_mode
            if stat.S_ISCHR(mode) and info.st_rdev == 0:
                parent, _, base = rel.rpartition("/")
                wh = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
                yield _header(wh, info, mtime)
            elif stat.S_ISDIR(mode):
                yield _header(rel + "/", info, mtime, type=tarfile.DIRTYPE)
                if _opaque(path):
                    yield _header(f"{rel}/.wh..wh..opq", info, mtime)
                yield from walk(path, rel + "/")
            elif stat.S_ISLNK(mode):
                yield _header(rel, info, mtime, type=tarfile.SYMTYPE,
                              linkname=os.readlink(path))
            elif stat.S_ISREG(mode):
                key = (info.st_dev, info.st_ino)
                if info.st_nlink > 1 and key in links:
                    yield _header(rel, info, mtime, type=tarfile.LNKTYPE, linkname=links[key])
                    continue
                links[key] = rel
                yield from _file(path, rel, info, mtime)
            elif stat.S_ISFIFO(mode):
                yield _header(rel, info, mtime, type=tarfile.FIFOTYPE)
            # sockets and (faked) device nodes are not part of an image

    yield from walk(root, "")
    yield bytes(2 * BLOCK)


def _file(path: str, rel: str, info: os.stat_result, mtime: int | None) -> Iterator[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except PermissionError:  # a file its owner may not read (mode 000): it is ours
        os.chmod(path, stat.S_IMODE(info.st_mode) | stat.S_IRUSR)
        try:
            f = open(path, "rb")  # noqa: SIM115
        finally:
            os.chmod(path, stat.S_IMODE(info.st_mode))  # the layer stays as it was
    with f:
        size = os.fstat(f.fileno()).st_size
        yield _header(rel, info, mtime, size=size)
        left = size
        while left:
            data = f.read(min(_CHUNK, left))
            if not data:  # shrank while read: pad, the header said size
                data = bytes(min(_CHUNK, left))
            yield data
            left -= len(data)
        yield bytes(-size % BLOCK)


class Reader(io.RawIOBase):
    """:func:`chunks` as a binary file, for code that reads layers from files."""

    def __init__(self, root: str, mtime: int | None = None) -> None:
        super().__init__()
        self._chunks = chunks(root, mtime)
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = chunk
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


def open_tree(root: str, mtime: int | None = None) -> BinaryIO:
    """:class:`Reader` buffered, as the layer readers expect a binary file."""
    return io.BufferedReader(Reader(root, mtime), _CHUNK)
