"""Telling what kind of image a path names: a SIF file, a bare squashfs or a sandbox."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from capsid.errors import ImageFormatError, ImageNotFoundError
from capsid.image import sif, squashfs


class Kind(enum.Enum):
    SIF = "sif"
    SQUASHFS = "squashfs"
    SANDBOX = "sandbox"


@dataclass(frozen=True)
class Image:
    """An image on disk and where its root filesystem lies in it."""

    path: Path
    kind: Kind
    #: Byte offset and size of the squashfs root filesystem (SIF and squashfs kinds).
    offset: int = 0
    size: int = 0


def locate(path: str | os.PathLike[str]) -> Image:
    """Identify the image at *path*; raise a clear error when it is none."""
    p = Path(path)
    if not os.path.lexists(p):
        raise ImageNotFoundError(f"image {p} does not exist", "check the path and try again")
    if p.is_dir():
        return Image(p, Kind.SANDBOX)
    try:
        with open(p, "rb") as f:
            head = f.read(1024)
    except PermissionError:
        raise ImageFormatError(f"cannot read image {p}: permission denied",
                               "ask its owner to make it readable") from None
    if head[32:41] == sif.MAGIC:
        with sif.SifImage(p) as image:
            part = image.primary_partition()
            if part is None:
                raise ImageFormatError(f"{p} has no primary system partition",
                                       "it holds no root filesystem to run; rebuild it")
            fs_type = part.partition()[0]
            if fs_type != sif.FsType.SQUASHFS:
                label = sif.FS_TYPE_LABELS.get(fs_type, str(fs_type))
                raise ImageFormatError(f"{p} has a {label} root filesystem",
                                       "capsid runs squashfs root filesystems only")
            return Image(p, Kind.SIF, part.offset, part.size)
    offset = _squashfs_offset(head)
    if offset is not None:
        return Image(p, Kind.SQUASHFS, offset, p.stat().st_size - offset)
    raise ImageFormatError(f"{p} is not a container image",
                           "give a .sif file, a squashfs file or a sandbox directory")


def _squashfs_offset(head: bytes) -> int | None:
    if head[:4] == squashfs.MAGIC:
        return 0
    # A squashfs may follow a launch line such as "#!/usr/bin/env run-singularity".
    if head[:2] == b"#!":
        newline = head.find(b"\n")
        if newline != -1 and head[newline + 1:newline + 5] == squashfs.MAGIC:
            return newline + 1
    return None
