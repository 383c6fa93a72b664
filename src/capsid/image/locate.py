"""Telling what kind of image a path names: a SIF file, a bare squashfs or a sandbox.

On every container start, so it reads a few bytes with ``os`` and ``struct`` only.
"""

from __future__ import annotations

import os
import stat

from capsid.errors import ImageFormatError, ImageNotFoundError, UsageError
from capsid.image import siftable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

SIF, SQUASHFS, SANDBOX = "sif", "squashfs", "sandbox"
#: a root made of stacked directories (a build step's), never a file on disk
LAYERS = "layers"
SQUASHFS_MAGIC = b"hsqs"
#: image sources Apptainer takes that capsid does not: (what they are, what to do instead)
_ELSEWHERE = {
    "library": ("library:// images (the Sylabs Cloud Library)",
                "use the image's docker:// or oras:// name if a registry has it, or copy its "
                "SIF file here"),
    "shub": ("shub:// images", "Singularity Hub is gone: use the image's docker:// name"),
    "docker-daemon": ("docker-daemon: images", "capsid reads no Docker engine: run 'docker "
                      "save IMAGE -o image.tar' where it runs, then use docker-archive:image.tar"),
}


class Image:
    """An image on disk, and where its squashfs root filesystem lies in it."""

    __slots__ = ("kind", "oci_config", "offset", "path", "size")

    def __init__(self, path: str, kind: str, offset: int = 0, size: int = 0,
                 oci_config: tuple[int, int] | None = None) -> None:
        self.path = path
        self.kind = kind  #: SIF, SQUASHFS, SANDBOX or LAYERS
        self.offset = offset
        self.size = size
        #: (offset, size) of the SIF's oci-config.json object, if it has one
        self.oci_config = oci_config

    def __repr__(self) -> str:
        return f"Image({self.path!r}, {self.kind!r}, offset={self.offset}, size={self.size})"


def read_limited(path: str, what: str, hint: str, limit: int = 1 << 20) -> bytes:
    """A small file the user names (a key, an env file): at most *limit* bytes, else one
    error (``/dev/zero`` must not fill memory). Pipes are read (``<(command)``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror}", hint) from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit >> 10} KiB", hint)
    return data


def open_file(path: str, what: str = "image") -> int:
    """A read-only fd of *path*, refused with one clear line unless it is a regular file.

    FIFOs, sockets and devices are refused before anything reads them, so a FIFO
    given by mistake cannot hang capsid (the open itself does not block).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageNotFoundError(f"{what} {path} does not exist",
                                 "check the path and try again") from None
    except PermissionError:
        raise ImageFormatError(f"cannot read {what} {path}: permission denied",
                               "ask its owner to make it readable") from None
    except OSError as err:  # a socket (ENXIO), a device without its driver, ...
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        _refuse_special(path, mode, what)
        raise ImageFormatError(f"cannot open {what} {path}: {err.strerror}",
                               "check the path and try again") from None
    try:
        _refuse_special(path, os.fstat(fd).st_mode, what)
    except BaseException:
        os.close(fd)
        raise
    os.set_blocking(fd, True)
    return fd


def _refuse_special(path: str, mode: int, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    raise ImageFormatError(f"{what} {path} is {kind}, not a file",
                           "give the path of a regular file")


#: the URI schemes capsid pulls, runs and builds from; other verbs want the file
_PULLED = ("docker", "oras", "docker-archive", "oci-archive", "oci", "http", "https")


def foreign_source(name: str) -> UsageError | None:
    """The error for *name* given as an image if it is a URI (``SCHEME://...``, or
    ``docker-daemon:``, ``docker-archive:``, ``oci-archive:``, ``oci:``) where a file is
    needed: a source capsid does not take (``library://``, ``shub://``, ...), or one to
    pull first. None for other names."""
    scheme, sep, _ = name.partition("://")
    if not sep:
        scheme, sep, _ = name.partition(":")
        if scheme not in ("docker-daemon", "docker-archive", "oci-archive", "oci"):
            return None
    if not scheme or "/" in scheme:
        return None
    if scheme == "instance":
        return UsageError("instance:// names are taken by exec, run, shell and test only",
                          "see 'capsid instance list' for the running ones")
    if scheme in _PULLED:
        return UsageError(f"this command reads an image file, not {name}",
                          f"pull it first (capsid pull IMAGE.sif {name}) and give IMAGE.sif")
    what, hint = _ELSEWHERE.get(scheme, (f"{scheme}:// images", "use a docker://, oras://, "
                                       "docker-archive:, oci-archive: or oci: URI, a SIF file "
                                       "or a directory"))
    return UsageError(f"{what} are not supported", hint)


def locate(path: str | os.PathLike[str]) -> Image:
    """Identify the image at *path*; raise a clear error when it is none."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        foreign = foreign_source(p)
        if foreign is not None:
            raise foreign
        raise ImageNotFoundError(f"image {p} does not exist", "check the path and try again")
    if os.path.isdir(p):
        return Image(p, SANDBOX)
    with open(open_file(p), "rb") as f:
        head = f.read(1024)
        if head[32:41] == siftable.MAGIC:
            f.seek(0)
            return _sif(f, p)
        size = os.fstat(f.fileno()).st_size
    offset = _squashfs_offset(head)
    if offset is not None:
        return Image(p, SQUASHFS, offset, size - offset)
    raise ImageFormatError(f"{p} is not a container image",
                           "give a .sif file, a squashfs file or a sandbox directory")


def _sif(f: BinaryIO, path: str) -> Image:
    _, descriptors = siftable.read_table(f, path)
    oci_config = next(((d[5], d[6]) for d in descriptors if d[0] == siftable.DATA_GENERIC_JSON
                       and siftable.cstr(d[12]) == "oci-config.json"), None)
    for d in descriptors:
        if d[0] != siftable.DATA_PARTITION:
            continue
        fs_type, part_type, _ = siftable.partition_types(d)
        if part_type != siftable.PART_PRIMARY_SYSTEM:
            continue
        if fs_type != siftable.FS_SQUASHFS:
            raise ImageFormatError(f"{path} has a root filesystem of type {fs_type}, "
                                   "not squashfs", "capsid runs squashfs root filesystems only")
        return Image(path, SIF, d[5], d[6], oci_config)
    raise ImageFormatError(f"{path} has no primary system partition",
                           "it holds no root filesystem to run; rebuild it")


def _squashfs_offset(head: bytes) -> int | None:
    if head[:4] == SQUASHFS_MAGIC:
        return 0
    # A squashfs may follow a launch line such as "#!/usr/bin/env run-singularity".
    if head[:2] == b"#!":
        newline = head.find(b"\n")
        if newline != -1 and head[newline + 1:newline + 5] == SQUASHFS_MAGIC:
            return newline + 1
    return None
