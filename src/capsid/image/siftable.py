"""A SIF file's global header and descriptor table, read with nothing but ``struct``.

This is the part of SIF that every container start needs (where is the root
filesystem?), kept free of heavy imports; :mod:`capsid.image.sif` builds its
records, the writer and the listings on top of it.
"""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

#: launch script[32] magic[10] version[3] arch[3] id[16] then 8 int64:
#: created_at, modified_at, descriptors_free, descriptors_total, descriptors_offset,
#: descriptors_size, data_offset, data_size  (128 bytes)
HEADER = struct.Struct("<32s10s3s3s16s8q")
#: data_type(int32) used(bool) id group_id linked_id (uint32 each) then 7 int64:
#: offset, size, size_with_padding, created_at, modified_at, uid, gid;
#: name[128] extra[384]  (585 bytes)
DESCRIPTOR = struct.Struct("<iBIIIqqqqqqq128s384s")
MAGIC = b"SIF_MAGIC"
VERSION = "01"
DATA_PARTITION = 0x4004
DATA_GENERIC_JSON = 0x4006
FS_SQUASHFS = 1
PART_PRIMARY_SYSTEM = 2

RawHeader = tuple[bytes, bytes, bytes, bytes, bytes, int, int, int, int, int, int, int, int]
RawDescriptor = tuple[int, int, int, int, int, int, int, int, int, int, int, int, bytes, bytes]


def cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def read_table(f: BinaryIO, path: str) -> tuple[RawHeader, list[RawDescriptor]]:
    """The header and the *used* descriptors of the SIF open as *f*, validated."""
    from capsid.errors import ImageFormatError

    def bad(what: str) -> ImageFormatError:
        return ImageFormatError(f"{path} is not a valid SIF image: {what}",
                                "rebuild or download the image again")

    size = os.fstat(f.fileno()).st_size
    raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise bad(f"the file is {len(raw)} bytes, shorter than a SIF header")
    header: RawHeader = HEADER.unpack(raw)
    if cstr(header[1]).encode() != MAGIC:
        raise bad("the SIF magic is missing")
    version = cstr(header[2])
    if version != VERSION:
        raise bad(f"SIF version {version!r} is not supported (only {VERSION})")
    total, offset = header[8], header[9]
    if total < 0 or offset < HEADER.size or total > 1 << 24:
        raise bad("the descriptor table is malformed")
    if offset + total * DESCRIPTOR.size > size:
        raise bad("the file is truncated inside the descriptor table")
    f.seek(offset)
    table = f.read(total * DESCRIPTOR.size)
    used = []
    for (d,) in zip(DESCRIPTOR.iter_unpack(table), strict=False):
        if not d[1]:
            continue
        if d[5] < 0 or d[6] < 0 or d[5] + d[6] > size:
            raise bad(f"object {d[2]} lies beyond the end of the file "
                      f"({d[5]}+{d[6]} > {size} bytes): the file is truncated")
        used.append(d)
    return header, used


def partition_types(d: RawDescriptor) -> tuple[int, int, str]:
    """(filesystem type, partition type, arch code) from a partition's extra bytes."""
    fs, part, arch = struct.unpack_from("<ii3s", d[13])
    return fs, part, cstr(arch)
