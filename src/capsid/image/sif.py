"""The Singularity Image Format (SIF), byte for byte as Apptainer writes it.

A SIF file is a 128-byte global header, an array of fixed-size object
descriptors (48 of 585 bytes at offset 4096 by default) and the objects' data.
All integers are little-endian and packed. Group and group-link IDs carry the
mask ``0xF0000000``. Partitions are aligned to 4096 bytes, the padding counted
in the descriptor's ``size_with_padding``.

Reading never trusts the file: a short header, a wrong magic, an unknown
version or a descriptor pointing past the end are :class:`ImageFormatError`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from capsid import arch
from capsid.errors import ImageFormatError
from capsid.image.siftable import DESCRIPTOR, HEADER, MAGIC, VERSION, cstr, read_table

# --- layout (the table itself is read by siftable) ------------------------------------------

LAUNCH_SCRIPT = "#!/usr/bin/env run-singularity\n"
DEFAULT_DESCRIPTORS = 48
DESCRIPTORS_OFFSET = 4096
PARTITION_ALIGNMENT = 4096
GROUP_MASK = 0xF0000000
#: Go's zero time.Time as Unix seconds: what deterministic SIF writers store.
ZERO_TIME = -62135596800


class DataType(enum.IntEnum):
    """What a data object holds (``Descriptor.data_type``)."""

    DEFFILE = 0x4001
    ENV_VARS = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B

    @property
    def label(self) -> str:
        """The name Apptainer's ``sif list`` prints."""
        return _DATA_TYPE_LABELS[self]


_DATA_TYPE_LABELS = {
    DataType.DEFFILE: "Def.FILE",
    DataType.ENV_VARS: "Env.Vars",
    DataType.LABELS: "JSON.Labels",
    DataType.PARTITION: "FS",
    DataType.SIGNATURE: "Signature",
    DataType.GENERIC_JSON: "JSON.Generic",
    DataType.GENERIC: "Generic/Raw",
    DataType.CRYPTO_MESSAGE: "Cryptographic Message",
    DataType.SBOM: "SBOM",
    DataType.OCI_ROOT_INDEX: "OCI.RootIndex",
    DataType.OCI_BLOB: "OCI.Blob",
}


class FsType(enum.IntEnum):
    SQUASHFS = 1
    EXT3 = 2
    IMMUTABLE_OBJECTS = 3
    RAW = 4
    ENCRYPTED_SQUASHFS = 5
    GOCRYPTFS_SQUASHFS = 6


FS_TYPE_LABELS = {1: "Squashfs", 2: "Ext3", 3: "Archive", 4: "Raw", 5: "Encrypted squashfs",
                  6: "Gocryptfs squashfs"}


class PartType(enum.IntEnum):
    SYSTEM = 1
    PRIMARY_SYSTEM = 2
    DATA = 3
    OVERLAY = 4


PART_TYPE_LABELS = {1: "System", 2: "*System", 3: "Data", 4: "Overlay"}
HASH_TYPE_LABELS = {1: "SHA-256", 2: "SHA-384", 3: "SHA-512", 4: "BLAKE2s-256", 5: "BLAKE2b-256"}
FORMAT_TYPE_LABELS = {1: "OpenPGP", 2: "PEM"}
MESSAGE_TYPE_LABELS = {0x100: "Clear Signature", 0x200: "RSA-OAEP"}
SBOM_FORMAT_LABELS = {1: "cyclonedx-json", 2: "cyclonedx-xml", 3: "github-json", 4: "spdx-json",
                      5: "spdx-rdf", 6: "spdx-tag-value", 7: "spdx-yaml", 8: "syft-json"}

#: SIF architecture codes ↔ Go architecture names (the machine table's)
ARCH_CODES = arch.SIF_CODES
ARCH_BY_NAME = {name: code for code, name in ARCH_CODES.items()}


def _pad(text: bytes, size: int) -> bytes:
    if len(text) > size:
        raise ValueError(f"{text!r} is longer than {size} bytes")
    return text.ljust(size, b"\0")


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The global header."""

    launch_script: str
    version: str
    arch_code: str
    id: uuid.UUID
    created_at: int
    modified_at: int
    descriptors_free: int
    descriptors_total: int
    descriptors_offset: int
    descriptors_size: int
    data_offset: int
    data_size: int

    @property
    def arch(self) -> str:
        """The primary architecture as a Go name (``amd64``), or ``unknown``."""
        return ARCH_CODES.get(self.arch_code, "unknown")

    def pack(self) -> bytes:
        return HEADER.pack(
            _pad(self.launch_script.encode(), 32), _pad(MAGIC, 10), _pad(self.version.encode(), 3),
            _pad(self.arch_code.encode(), 3), self.id.bytes, self.created_at, self.modified_at,
            self.descriptors_free, self.descriptors_total, self.descriptors_offset,
            self.descriptors_size, self.data_offset, self.data_size,
        )


@dataclass(frozen=True)
class Descriptor:
    """One object descriptor; ``group_id`` and ``linked_id`` are stored raw (masked)."""

    data_type: int
    used: bool
    id: int
    raw_group_id: int
    raw_linked_id: int
    offset: int
    size: int
    size_with_padding: int
    created_at: int
    modified_at: int
    uid: int
    gid: int
    name: str
    extra: bytes

    def pack(self) -> bytes:
        return DESCRIPTOR.pack(
            self.data_type, int(self.used), self.id, self.raw_group_id, self.raw_linked_id,
            self.offset, self.size, self.size_with_padding, self.created_at, self.modified_at,
            self.uid, self.gid, _pad(self.name.encode(), 128), _pad(self.extra, 384),
        )

    @property
    def group(self) -> int:
        """The object group (1-based), or 0 for none."""
        return self.raw_group_id & ~GROUP_MASK

    @property
    def link(self) -> tuple[int, bool]:
        """(linked ID, whether it names a group); (0, False) when unlinked."""
        if self.raw_linked_id & GROUP_MASK == GROUP_MASK:
            return self.raw_linked_id & ~GROUP_MASK, True
        return self.raw_linked_id, False

    @property
    def type_label(self) -> str:
        try:
            return DataType(self.data_type).label
        except ValueError:
            return f"Unknown ({self.data_type:#x})"

    def partition(self) -> tuple[int, int, str]:
        """(filesystem type, partition type, arch name) of a partition object."""
        fs, part, arch = struct.unpack_from("<ii3s", self.extra)
        return fs, part, ARCH_CODES.get(cstr(arch), "unknown")

    def signature(self) -> tuple[int, bytes]:
        """(hash type, signing entity fingerprint) of a signature object."""
        hash_type, entity = struct.unpack_from("<i256s", self.extra)
        return hash_type, entity[:20]

    def crypto_message(self) -> tuple[int, int]:
        """(format type, message type) of a cryptographic message object."""
        fmt, msg = struct.unpack_from("<ii", self.extra)
        return fmt, msg

    def sbom_format(self) -> int:
        return int(struct.unpack_from("<i", self.extra)[0])

    def oci_digest(self) -> str:
        return cstr(self.extra)

    def details(self) -> str:
        """The type and its metadata as ``sif list`` shows it: ``FS (Squashfs/*System/amd64)``."""
        label = self.type_label
        if self.data_type == DataType.PARTITION:
            fs, part, arch = self.partition()
            return (f"{label} ({FS_TYPE_LABELS.get(fs, f'Unknown ({fs})')}/"
                    f"{PART_TYPE_LABELS.get(part, f'Unknown ({part})')}/{arch})")
        if self.data_type == DataType.SIGNATURE:
            return f"{label} ({HASH_TYPE_LABELS.get(self.signature()[0], 'Unknown')})"
        if self.data_type == DataType.CRYPTO_MESSAGE:
            fmt, msg = self.crypto_message()
            return (f"{label} ({FORMAT_TYPE_LABELS.get(fmt, 'Unknown')}/"
                    f"{MESSAGE_TYPE_LABELS.get(msg, 'Unknown')})")
        if self.data_type == DataType.SBOM:
            return f"{label} ({SBOM_FORMAT_LABELS.get(self.sbom_format(), 'Unknown')})"
        return label


# --- reading ------------------------------------------------------------------------------


class SifImage:
    """A SIF file opened for reading; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        from capsid.image.locate import open_file

        self._file: BinaryIO = open(open_file(str(self.path)), "rb")  # noqa: SIM115
        try:
            self.header, self.descriptors = self._load()
        except BaseException:
            self._file.close()
            raise

    def _load(self) -> tuple[Header, list[Descriptor]]:
        raw, used = read_table(self._file, str(self.path))
        header = Header(cstr(raw[0]), cstr(raw[2]), cstr(raw[3]), uuid.UUID(bytes=raw[4]),
                        *raw[5:])
        return header, [Descriptor(d[0], bool(d[1]), *d[2:12], cstr(d[12]), d[13]) for d in used]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SifImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, object_id: int) -> Descriptor:
        for d in self.descriptors:
            if d.id == object_id:
                return d
        from capsid.errors import UsageError

        raise UsageError(f"{self.path} has no object with ID {object_id}",
                         "list the objects with 'capsid sif list'")

    def find(self, data_type: int, name: str | None = None) -> Descriptor | None:
        """The first object of *data_type* (and *name*, if given)."""
        for d in self.descriptors:
            if d.data_type == data_type and (name is None or d.name == name):
                return d
        return None

    def primary_partition(self) -> Descriptor | None:
        for d in self.descriptors:
            if d.data_type == DataType.PARTITION and d.partition()[1] == PartType.PRIMARY_SYSTEM:
                return d
        return None

    def read(self, d: Descriptor) -> bytes:
        self._file.seek(d.offset)
        return self._file.read(d.size)

    def copy_to(self, d: Descriptor, out: BinaryIO, chunk: int = 1 << 20) -> None:
        """Stream object *d* to *out*."""
        self._file.seek(d.offset)
        left = d.size
        while left:
            block = self._file.read(min(chunk, left))
            if not block:
                raise ImageFormatError(f"{self.path}: object {d.id} ends early",
                                       "the file is truncated; download or build it again")
            out.write(block)
            left -= len(block)


def is_sif(path: str | os.PathLike[str]) -> bool:
    """Whether *path* is a regular file that starts like a SIF image."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError:
        return False
    return len(head) >= 42 and head[32:41] == MAGIC


# --- writing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewObject:
    """An object to write: its bytes, or a file whose contents are copied in."""

    data_type: DataType
    data: bytes | Path
    name: str = ""
    group: int = 1
    link: int = 0
    extra: bytes = b""
    alignment: int = 0
    length: int | None = None  #: a file's size, when fixed already

    @classmethod
    def partition(cls, path: Path, arch: str, *, fs: FsType = FsType.SQUASHFS,
                  part: PartType = PartType.PRIMARY_SYSTEM, name: str = "") -> NewObject:
        code = ARCH_BY_NAME.get(arch, "00")
        extra = struct.pack("<ii3s", fs, part, code.encode())
        return cls(DataType.PARTITION, path, name, extra=extra, alignment=PARTITION_ALIGNMENT)

    @property
    def size(self) -> int:
        if self.length is not None:
            return self.length
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)

    @property
    def arch_code(self) -> str:
        if self.data_type == DataType.PARTITION and struct.unpack_from("<i", self.extra, 4)[0] \
                == PartType.PRIMARY_SYSTEM:
            return cstr(self.extra[8:11])
        return ""


@dataclass
class _Layout:
    offset: int
    padding: int
    obj: NewObject = field(repr=False)


def _copy_range(src: Path, out_fd: int, offset: int) -> None:
    """Copy file *src* into *out_fd* at *offset* inside the kernel (no user-space pass)."""
    from capsid.image.output import copy_range

    with open(src, "rb") as f:
        try:
            copy_range(f.fileno(), out_fd, os.fstat(f.fileno()).st_size, 0, offset)
        except EOFError:
            raise OSError(f"short copy from {src}") from None


_FALLOC_FL_INSERT_RANGE = 0x20


def _insert_range(fd: int, length: int) -> bool:
    """Shift the whole file *length* bytes up, a hole in front, moving no data (ext4,
    XFS: whole blocks only). False where the file system or the length does not allow."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return bool(libc.fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, length) == 0)


def write_in_place(partition: Path, objects: Iterable[NewObject], *, created_at: int,
                   image_id: uuid.UUID) -> bool:
    """Make the SIF out of file *partition* itself, the last of *objects*.

    Room for the header and the other objects is inserted in front of the squashfs
    (no copy of it, whatever its size) and they are written there; the bytes are
    those :func:`write` makes. Returns False, changing nothing, where the file system
    cannot insert (tmpfs, NFS): then :func:`write` a new file.
    """
    objs = list(objects)
    if not objs or objs[-1].data != partition:
        raise ValueError("the partition must be the last object")
    objs[-1] = dataclasses.replace(objs[-1], length=objs[-1].size)  # before it moves
    offset = _layout(objs, DEFAULT_DESCRIPTORS)[0][-1].offset
    with open(partition, "r+b") as f:
        if not _insert_range(f.fileno(), offset):
            return False
        write(f, objs, created_at=created_at, image_id=image_id, placed=True)
    return True


def _layout(objs: list[NewObject], descriptors: int) -> tuple[list[_Layout], int, int]:
    """Where each object goes, the start of the data, and its end."""
    data_offset = DESCRIPTORS_OFFSET + descriptors * DESCRIPTOR.size
    layout, pos = [], data_offset
    for obj in objs:
        start = pos if not obj.alignment else -(-pos // obj.alignment) * obj.alignment
        layout.append(_Layout(start, start - pos, obj))
        pos = start + obj.size
    return layout, data_offset, pos


def write(out: BinaryIO, objects: Iterable[NewObject], *, created_at: int,
          image_id: uuid.UUID | None = None, descriptors: int = DEFAULT_DESCRIPTORS,
          launch_script: str = LAUNCH_SCRIPT, placed: bool = False) -> uuid.UUID:
    """Write a complete SIF image to *out* (a new, empty, seekable file).

    Objects are laid out in order after the descriptor table, partitions aligned
    to 4096. With *image_id* ``None`` the ID is derived from a SHA-256 of the
    objects' contents, so the same inputs give the same bytes; callers that
    know a cheaper content key (an OCI manifest) pass an ID made from it, and
    file objects are then copied in-kernel without being read. With *placed* the
    last object is in *out* at its place already. Returns the ID.
    """
    objs = list(objects)
    if len(objs) > descriptors:
        raise ValueError("more objects than descriptors")
    layout, data_offset, pos = _layout(objs, descriptors)
    if placed and image_id is None:
        raise ValueError("an object placed already needs an image_id")
    digest = hashlib.sha256()
    for index, item in enumerate(layout):
        out.seek(item.offset)
        digest.update(item.obj.name.encode() + b"\0")
        if placed and index == len(layout) - 1:
            continue
        if isinstance(item.obj.data, Path) and image_id is not None:
            out.flush()
            _copy_range(item.obj.data, out.fileno(), item.offset)
        elif isinstance(item.obj.data, Path):
            with open(item.obj.data, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        else:
            digest.update(item.obj.data)
            out.write(item.obj.data)
    if image_id is None:
        image_id = uuid.UUID(bytes=digest.digest()[:16], version=4)
    arch = next((o.arch_code for o in objs if o.arch_code), "00")
    table = bytearray()
    for index, item in enumerate(layout):
        o = item.obj
        table += Descriptor(
            o.data_type, True, index + 1, GROUP_MASK | o.group, o.link, item.offset, o.size,
            item.padding + o.size, created_at, created_at, 0, 0, o.name, o.extra,
        ).pack()
    table = table.ljust(descriptors * DESCRIPTOR.size, b"\0")
    header = Header(launch_script, VERSION, arch, image_id, created_at, created_at,
                    descriptors - len(objs), descriptors, DESCRIPTORS_OFFSET,
                    descriptors * DESCRIPTOR.size, data_offset, pos - data_offset)
    out.seek(0)
    out.write(header.pack().ljust(DESCRIPTORS_OFFSET, b"\0"))
    out.write(table)
    out.seek(0, os.SEEK_END)
    if out.tell() < pos:
        out.truncate(pos)
    return image_id


def add_object(path: Path, obj: NewObject, *, when: int) -> int:
    """Add *obj* to SIF *path* as Apptainer's library does (the first free descriptor,
    its data after the last object's); returns its ID. The image is rewritten to a
    temporary copy beside it and renamed over it: a crash or Ctrl-C leaves it as it was.
    """
    from capsid.image import output

    if not isinstance(obj.data, bytes):
        raise ValueError("only objects given as bytes can be added")
    with SifImage(path) as image:
        header, table_offset = image.header, image.header.descriptors_offset
        raw = os.pread(image._file.fileno(), header.descriptors_total * DESCRIPTOR.size,
                       table_offset)
        mode = os.fstat(image._file.fileno()).st_mode & 0o7777
    raw_table = [DESCRIPTOR.unpack_from(raw, i * DESCRIPTOR.size)
                 for i in range(len(raw) // DESCRIPTOR.size)]
    slot = next((i for i, d in enumerate(raw_table) if not d[1]), None)
    if slot is None or header.descriptors_free <= 0:
        raise ImageFormatError(f"{path} has no free object descriptor left",
                               "rebuild the image (capsid writes 48 descriptors)")
    start = header.data_offset + header.data_size
    if obj.alignment:
        start = -(-start // obj.alignment) * obj.alignment
    new_id = slot + 1
    descriptor = Descriptor(obj.data_type, True, new_id, GROUP_MASK | obj.group if obj.group
                            else 0, obj.link, start, len(obj.data),
                            start - (header.data_offset + header.data_size) + len(obj.data),
                            when, when, 0, 0, obj.name, obj.extra)
    new_header = dataclasses.replace(
        header, modified_at=when, descriptors_free=header.descriptors_free - 1,
        data_size=start + len(obj.data) - header.data_offset)
    with output.atomic_file(path, force=True, mode=mode) as tmp, open(path, "rb") as src, \
            open(tmp, "r+b" if tmp.exists() else "wb") as out:
        try:
            output.copy_range(src.fileno(), out.fileno(), os.fstat(src.fileno()).st_size, 0, 0)
        except EOFError:
            raise OSError(f"short copy of {path}") from None
        out.truncate(start)
        os.pwrite(out.fileno(), obj.data, start)
        os.pwrite(out.fileno(), descriptor.pack(), table_offset + slot * DESCRIPTOR.size)
        os.pwrite(out.fileno(), new_header.pack(), 0)
    return new_id
