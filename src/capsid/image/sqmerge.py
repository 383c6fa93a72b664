"""One squashfs laid over another without compressing the lower one again.

A build adds a few files to a base of hundreds of megabytes; compressing the base once
more costs seconds. Squashfs keeps file data in blocks addressed by absolute offsets and
the tree in metadata tables addressed relative to each table's start, so a merged image
can keep the lower image's data blocks, inode table and directory table byte for byte
and add behind them the upper image's data blocks (made by ``tar2sqfs``), the upper
inodes and a new copy of every directory on a path the upper one changes, up to the
root. Directories the upper image does not touch are the lower image's, unchanged.

The upper tree wins as an OCI layer does: its entries replace the lower ones, its
directories merge with the lower ones, and *hidden* paths (whiteouts) and *opaque*
directories drop the lower entries below them. Added metadata blocks are stored
uncompressed (they are small, and their positions are then known before they are
written). The lower image's extended attributes are kept. Images this module cannot
merge (other block sizes or compressors, extended attributes in the upper image, a
compressor without a Python codec) raise :class:`Unmergeable`, and the caller writes
the whole image instead.

The format is that of squashfs 4.0 (the kernel's ``Documentation/filesystems/squashfs.rst``
and squashfs-tools' ``squashfs_fs.h``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from capsid.image.flatten import Cover
from capsid.image.output import copy_range

SUPER = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")
MAGIC = 0x73717368
NONE = 0xFFFFFFFFFFFFFFFF
NO_FRAGMENT = 0xFFFFFFFF
NO_XATTR = 0xFFFFFFFF
META = 8192
_UNCOMPRESSED_META = 0x8000
_COMPRESSOR_OPTIONS = 0x0400
_NO_FRAGMENTS = 0x0010
_EXPORTABLE = 0x0080

DIR, FILE, SYMLINK, BLKDEV, CHRDEV, FIFO, SOCKET = range(1, 8)
_EXTENDED = 7  #: an extended inode's type is the basic one plus 7


#: squashfs's id for zstd, and squashfs-tools-ng's level for it when an image stores no
#: compressor options
_ZSTD, _ZSTD_DEFAULT_LEVEL = 6, 15


def zstd_level(f: BinaryIO, offset: int = 0) -> int | None:
    """The zstd level of the squashfs at *offset* in *f* (None if it is not zstd), so that
    what is laid over it is compressed alike: a merge needs both images' compressor
    options to be the same bytes (a base pulled by another version of capsid)."""
    f.seek(offset)
    raw = f.read(SUPER.size + 6)
    if len(raw) < SUPER.size + 6 or struct.unpack_from("<I", raw)[0] != MAGIC:
        return None
    sb = Super(*SUPER.unpack_from(raw)[1:])
    if sb.compression != _ZSTD:
        return None
    if not sb.flags & _COMPRESSOR_OPTIONS:
        return _ZSTD_DEFAULT_LEVEL
    header, level = struct.unpack_from("<HI", raw, SUPER.size)
    return int(level) if header == (_UNCOMPRESSED_META | 4) else None


class Unmergeable(Exception):
    """The two images cannot be merged here; write the whole image instead."""


@dataclass(frozen=True)
class Super:
    """A squashfs superblock."""

    inode_count: int
    mtime: int
    block_size: int
    fragments: int
    compression: int
    block_log: int
    flags: int
    id_count: int
    major: int
    minor: int
    root: int
    bytes_used: int
    id_table: int
    xattr_table: int
    inode_table: int
    dir_table: int
    fragment_table: int
    export_table: int

    def pack(self) -> bytes:
        return SUPER.pack(MAGIC, self.inode_count, self.mtime, self.block_size,
                          self.fragments, self.compression, self.block_log, self.flags,
                          self.id_count, self.major, self.minor, self.root, self.bytes_used,
                          self.id_table, self.xattr_table, self.inode_table, self.dir_table,
                          self.fragment_table, self.export_table)


@dataclass
class Inode:
    """One inode, decoded (fields that do not apply to its type stay 0)."""

    kind: int  #: the basic type, DIR..SOCKET
    mode: int
    uid: int  #: index into the id table
    gid: int
    mtime: int
    number: int
    nlink: int = 1
    xattr: int = NO_XATTR
    # regular files
    start: int = 0
    fragment: int = NO_FRAGMENT
    frag_offset: int = 0
    size: int = 0
    sparse: int = 0
    blocks: tuple[int, ...] = ()
    # directories
    dir_block: int = 0
    dir_offset: int = 0
    dir_size: int = 3
    parent: int = 0
    # symbolic links and devices
    target: bytes = b""
    rdev: int = 0


@dataclass
class Entry:
    """A directory entry: a name, the inode's type, where it is and its number."""

    name: bytes
    kind: int
    ref: int
    number: int


def _codec(compression: int) -> Callable[[bytes], bytes]:
    """Decompression for a squashfs compressor id."""
    if compression == 1:
        import zlib
        return zlib.decompress
    if compression == 4:
        import lzma
        return lambda data: lzma.LZMADecompressor().decompress(data)
    if compression == 6:
        import zstandard
        return lambda data: zstandard.ZstdDecompressor().decompress(
            data, max_output_size=1 << 20)
    raise Unmergeable(f"squashfs compressor {compression} has no Python codec here")


class Image:
    """A squashfs image in a file, at an offset, read on demand."""

    def __init__(self, f: BinaryIO, offset: int = 0) -> None:
        self.f, self.offset = f, offset
        f.seek(offset)
        raw = f.read(SUPER.size)
        if len(raw) != SUPER.size or struct.unpack_from("<I", raw)[0] != MAGIC:
            raise Unmergeable("not a squashfs image")
        self.sb = Super(*SUPER.unpack(raw)[1:])
        if (self.sb.major, self.sb.minor) != (4, 0):
            raise Unmergeable("not squashfs 4.0")
        self.decompress = _codec(self.sb.compression)
        self._blocks: dict[int, tuple[bytes, int]] = {}
        self.data_start = SUPER.size
        if self.sb.flags & _COMPRESSOR_OPTIONS:
            header = struct.unpack("<H", self.pread(SUPER.size, 2))[0]
            self.data_start += 2 + (header & 0x7FFF)
        self.ids = list(self._table(self.sb.id_table, self.sb.id_count, 4))
        self.frags = list(self._table(self.sb.fragment_table, self.sb.fragments, 16))

    def pread(self, pos: int, n: int) -> bytes:
        if not (0 <= pos < 1 << 62 and 0 <= n <= 1 << 26):
            raise Unmergeable("a position or size out of range")
        data = os.pread(self.f.fileno(), n, self.offset + pos)
        if len(data) != n:
            raise Unmergeable("the image is truncated")
        return data

    def block(self, pos: int) -> tuple[bytes, int]:
        """The metadata block at absolute *pos*: its bytes, and where the next starts."""
        cached = self._blocks.get(pos)
        if cached is None:
            header = struct.unpack("<H", self.pread(pos, 2))[0]
            size = header & 0x7FFF or 0x8000
            raw = self.pread(pos + 2, size)
            data = raw if header & _UNCOMPRESSED_META else self.decompress(raw)
            cached = self._blocks[pos] = (data, pos + 2 + size)
        return cached

    def meta(self, table: int, block: int, offset: int, n: int) -> bytes:
        """*n* bytes of a metadata table from block *block* (relative), *offset* in it."""
        out = bytearray()
        pos = table + block
        while len(out) < n:
            data, following = self.block(pos)
            out += data[offset:offset + n - len(out)]
            offset, pos = 0, following
        return bytes(out)

    def _table(self, start: int, count: int, size: int) -> Iterator[bytes]:
        """The entries of an indexed table (ids, fragments): *count* of *size* bytes."""
        per = META // size
        blocks = -(-count // per)
        if not count:
            return
        pointers = struct.unpack(f"<{blocks}Q", self.pread(start, 8 * blocks))
        for i, pointer in enumerate(pointers):
            data = self.block(pointer)[0]
            n = min(per, count - i * per)
            for k in range(n):
                yield data[k * size:(k + 1) * size]

    # -- the tree ------------------------------------------------------------------------------

    def inode(self, ref: int) -> Inode:
        block, offset = ref >> 16, ref & 0xFFFF
        read = self._reader(block, offset)
        kind, mode, uid, gid, mtime, number = struct.unpack("<HHHHII", read(16))
        node = Inode(kind if kind <= SOCKET else kind - _EXTENDED, mode, uid, gid, mtime, number)
        if kind == 1:
            node.dir_block, node.nlink, node.dir_size, node.dir_offset, node.parent = \
                struct.unpack("<IIHHI", read(16))
        elif kind == 8:
            (node.nlink, node.dir_size, node.dir_block, node.parent, count, node.dir_offset,
             node.xattr) = struct.unpack("<IIIIHHI", read(24))
            for _ in range(count):  # the index is rebuilt by nobody: skip it
                read(8)
                read(struct.unpack("<I", read(4))[0] + 1)
        elif kind in (2, 9):
            if kind == 2:
                node.start, node.fragment, node.frag_offset, node.size = \
                    struct.unpack("<IIII", read(16))
            else:
                (node.start, node.size, node.sparse, node.nlink, node.fragment,
                 node.frag_offset, node.xattr) = struct.unpack("<QQQIIII", read(40))
            count = node.size // self.sb.block_size if node.fragment != NO_FRAGMENT \
                else -(-node.size // self.sb.block_size)
            node.blocks = struct.unpack(f"<{count}I", read(4 * count))
        elif kind in (3, 10):
            node.nlink, length = struct.unpack("<II", read(8))
            node.target = read(length)
            if kind == 10:
                node.xattr = struct.unpack("<I", read(4))[0]
        elif kind in (4, 5, 11, 12):
            node.nlink, node.rdev = struct.unpack("<II", read(8))
            if kind > 7:
                node.xattr = struct.unpack("<I", read(4))[0]
        elif kind in (6, 7, 13, 14):
            node.nlink = struct.unpack("<I", read(4))[0]
            if kind > 7:
                node.xattr = struct.unpack("<I", read(4))[0]
        else:
            raise Unmergeable(f"inode type {kind}")
        return node

    def _reader(self, block: int, offset: int) -> Callable[[int], bytes]:
        """Sequential reads through the inode table from a position."""
        state = [self.sb.inode_table + block, offset]

        def read(n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                data, following = self.block(state[0])
                take = data[state[1]:state[1] + n - len(out)]
                out += take
                state[1] += len(take)
                if state[1] >= len(data):
                    state[0], state[1] = following, 0
            return bytes(out)
        return read

    def entries(self, node: Inode) -> list[Entry]:
        """A directory's entries, in the image's (sorted) order."""
        listing = self.meta(self.sb.dir_table, node.dir_block, node.dir_offset,
                            node.dir_size - 3)
        out, pos = [], 0
        while pos < len(listing):
            count, start, base = struct.unpack_from("<III", listing, pos)
            pos += 12
            for _ in range(count + 1):
                offset, delta, kind, size = struct.unpack_from("<HhHH", listing, pos)
                name = listing[pos + 8:pos + 9 + size]
                pos += 9 + size
                out.append(Entry(name, kind, (start << 16) | offset, base + delta))
        return out


# --- the merged tree -------------------------------------------------------------------------


@dataclass
class _Dir:
    """A directory written anew: its attributes and its entries."""

    attrs: Inode
    children: dict[bytes, _Dir | _Old | _New] = field(default_factory=dict)


@dataclass(frozen=True)
class _Old:
    """A lower entry kept as it is."""

    entry: Entry


@dataclass(frozen=True)
class _New:
    """An upper inode (not a directory), shared by its hard links."""

    ref: int
    kind: int


class _Merge:
    def __init__(self, lower: Image, upper: Image, cover: Cover) -> None:
        self.lower, self.upper = lower, upper
        self.hidden, self.opaque, self.made = cover.hidden, cover.opaque, cover.made
        #: directories holding a hidden or opaque path: walked even where the upper has none
        self.touched = {""} | set(cover.opaque)
        for path in cover.hidden | cover.opaque:
            while path:
                path = path.rpartition("/")[0]
                self.touched.add(path)
        self.ids = list(lower.ids)
        self._id_index = {raw: i for i, raw in enumerate(self.ids)}

    def upper_id(self, index: int) -> int:
        raw = self.upper.ids[index]
        if raw not in self._id_index:
            self._id_index[raw] = len(self.ids)
            self.ids.append(raw)
        if len(self.ids) > 0xFFFF:
            raise Unmergeable("more than 65535 owners")
        return self._id_index[raw]

    def tree(self) -> _Dir:
        lower_root = self.lower.inode(self.lower.sb.root)
        upper_root = self.upper.inode(self.upper.sb.root)
        return self.directory("", lower_root, upper_root)

    def directory(self, path: str, lower: Inode | None, upper: Inode | None) -> _Dir:
        """The merged directory at *path* from the lower and upper ones (either may be
        missing, not both)."""
        if upper is not None and (lower is None or path in self.made):
            attrs = replace(upper, uid=self.upper_id(upper.uid), gid=self.upper_id(upper.gid))
        else:
            assert lower is not None
            attrs = replace(lower)
        node = _Dir(attrs)
        if lower is not None and path not in self.opaque:
            for entry in self.lower.entries(lower):
                child = _join(path, entry.name)
                if child not in self.hidden:
                    node.children[entry.name] = _Old(entry)
        if upper is not None:
            for entry in self.upper.entries(upper):
                child = _join(path, entry.name)
                if entry.kind == DIR:
                    below = node.children.get(entry.name)
                    old = self.lower.inode(below.entry.ref) if isinstance(below, _Old) \
                        and below.entry.kind == DIR else None
                    node.children[entry.name] = self.directory(
                        child, old, self.upper.inode(entry.ref))
                else:
                    node.children[entry.name] = _New(entry.ref, entry.kind)
        for name, child_node in list(node.children.items()):
            child = _join(path, name)
            if isinstance(child_node, _Old) and child_node.entry.kind == DIR \
                    and child in self.touched:
                node.children[name] = self.directory(
                    child, self.lower.inode(child_node.entry.ref), None)
        return node


def _join(parent: str, name: bytes) -> str:
    text = name.decode("utf-8", "surrogateescape")
    return f"{parent}/{text}" if parent else text


# --- writing -----------------------------------------------------------------------------------


def _inode_bytes(node: Inode) -> bytes:
    """*node* encoded, in its basic form where that can hold it."""
    head = struct.Struct("<HHHHII")

    def header(kind: int) -> bytes:
        return head.pack(kind, node.mode, node.uid, node.gid, node.mtime, node.number)
    if node.kind == DIR:
        if node.dir_size <= 0xFFFF and node.dir_block < 1 << 32 and node.xattr == NO_XATTR:
            return header(1) + struct.pack("<IIHHI", node.dir_block, node.nlink, node.dir_size,
                                           node.dir_offset, node.parent)
        return header(8) + struct.pack("<IIIIHHI", node.nlink, node.dir_size, node.dir_block,
                                       node.parent, 0, node.dir_offset, node.xattr)
    if node.kind == FILE:
        blocks = struct.pack(f"<{len(node.blocks)}I", *node.blocks)
        if node.start < 1 << 32 and node.size < 1 << 32 and node.nlink == 1 \
                and not node.sparse and node.xattr == NO_XATTR:
            return header(2) + struct.pack("<IIII", node.start, node.fragment,
                                           node.frag_offset, node.size) + blocks
        return header(9) + struct.pack("<QQQIIII", node.start, node.size, node.sparse,
                                       node.nlink, node.fragment, node.frag_offset,
                                       node.xattr) + blocks
    ext = node.xattr != NO_XATTR
    tail = struct.pack("<I", node.xattr) if ext else b""
    kind = node.kind + _EXTENDED if ext else node.kind
    if node.kind == SYMLINK:
        return header(kind) + struct.pack("<II", node.nlink, len(node.target)) + node.target \
            + tail
    if node.kind in (BLKDEV, CHRDEV):
        return header(kind) + struct.pack("<II", node.nlink, node.rdev) + tail
    return header(kind) + struct.pack("<I", node.nlink) + tail


class _Table:
    """A metadata table being laid out: uncompressed 8 KiB blocks after *base* bytes of
    blocks copied from the lower image."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.data = bytearray()

    def add(self, raw: bytes) -> tuple[int, int]:
        """Append *raw*; (block relative to the table, offset in it) where it starts."""
        pos = len(self.data)
        self.data += raw
        return self.base + (pos // META) * (META + 2), pos % META

    def blocks(self) -> bytes:
        out = bytearray()
        for i in range(0, len(self.data), META):
            chunk = self.data[i:i + META]
            out += struct.pack("<H", len(chunk) | _UNCOMPRESSED_META) + chunk
        return bytes(out)


def _listing(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    """A directory listing of sorted (name, kind, ref, number)."""
    out = bytearray()
    i = 0
    while i < len(entries):
        start, number = entries[i][2] >> 16, entries[i][3]
        group: list[tuple[bytes, int, int, int]] = []
        while i < len(entries) and len(group) < 256 and entries[i][2] >> 16 == start \
                and -0x8000 <= entries[i][3] - number <= 0x7FFF:
            group.append(entries[i])
            i += 1
        out += struct.pack("<III", len(group) - 1, start, number)
        for name, kind, ref, num in group:
            out += struct.pack("<HhHH", ref & 0xFFFF, num - number, kind, len(name) - 1) + name
    return bytes(out)


def _table_end(image: Image, start: int) -> int:
    """Where the table that begins at *start* ends: the next known position after it."""
    sb = image.sb
    marks = [sb.bytes_used, sb.id_table, sb.fragment_table, sb.inode_table, sb.dir_table]
    if sb.xattr_table != NONE:
        marks += struct.unpack("<Q", image.pread(sb.xattr_table, 8))
    for table, count, size in ((sb.id_table, sb.id_count, 4),
                               (sb.fragment_table, sb.fragments, 16)):
        blocks = -(-count // (META // size))
        if blocks:
            marks += struct.unpack(f"<{blocks}Q", image.pread(table, 8 * blocks))
    if sb.export_table != NONE:
        marks.append(sb.export_table)
        blocks = -(-sb.inode_count // (META // 8))
        marks += struct.unpack(f"<{blocks}Q", image.pread(sb.export_table, 8 * blocks))
    return min(p for p in marks if p > start)


def _xattrs(lower: Image, out: BinaryIO) -> int:
    """Copy the lower image's extended attributes to *out* (at its end): the key/value
    blocks, the id blocks, and the id table, whose absolute positions move. The lower
    inodes name their attributes by id, so theirs stay right. Returns where the table
    is (NONE without attributes)."""
    start = lower.sb.xattr_table
    if start == NONE:
        return NONE
    kv, count = struct.unpack("<QI", lower.pread(start, 12))
    kv, count = int(kv), int(count)
    blocks = -(-count // (META // 16))
    pointers = struct.unpack(f"<{blocks}Q", lower.pread(start + 16, 8 * blocks))
    if not kv < start or any(not kv <= p < start for p in pointers):
        raise Unmergeable("a malformed extended attribute table")
    shift = out.tell() - kv
    _copy(lower.f, lower.offset + kv, out, start - kv)
    out.write(struct.pack("<QII", kv + shift, count, 0))
    out.write(struct.pack(f"<{blocks}Q", *(p + shift for p in pointers)))
    return start + shift


def _indexed(data: bytes, entry: int, at: int) -> tuple[bytes, int]:
    """An indexed table (ids, fragments) of *data* placed at *at*: its uncompressed
    metadata blocks followed by the index of their positions; and the index's position."""
    per = (META // entry) * entry
    blocks, pointers = bytearray(), []
    for i in range(0, len(data), per):
        chunk = data[i:i + per]
        pointers.append(at + len(blocks))
        blocks += struct.pack("<H", len(chunk) | _UNCOMPRESSED_META) + chunk
    return bytes(blocks) + struct.pack(f"<{len(pointers)}Q", *pointers), at + len(blocks)


def _copy(src: BinaryIO, src_pos: int, out: BinaryIO, length: int) -> None:
    """*length* bytes of *src* from *src_pos* to *out*'s current position."""
    if length < 0:
        raise Unmergeable("the image's tables are out of order")
    out.flush()
    dst_pos = out.tell()
    try:
        copy_range(src.fileno(), out.fileno(), length, src_pos, dst_pos)
    except EOFError:
        raise Unmergeable("the image is truncated") from None
    out.seek(dst_pos + length)


def merge(lower_file: BinaryIO, lower_offset: int, upper_file: BinaryIO, out: BinaryIO,
          cover: Cover) -> None:
    """Write to *out* (empty) *upper_file*'s squashfs laid over the one in *lower_file*
    at *lower_offset*, as *cover* (the upper image's layers) says.

    Hidden lower paths and everything below opaque lower directories are left out; an
    upper directory without an entry of its own (``tar2sqfs`` made it for the entries
    below it) keeps the lower one's attributes.
    """
    if cover.unlinked:
        raise Unmergeable("hard links to lower files")
    damaged: tuple[type[Exception], ...] = (struct.error, IndexError, KeyError, ValueError,
                                            RecursionError, OverflowError, MemoryError,
                                            *_codec_errors())
    try:
        _merge(lower_file, lower_offset, upper_file, out, cover)
    except damaged as e:  # the caller writes the whole image instead
        raise Unmergeable(f"an image cannot be read ({e})") from None


def _codec_errors() -> tuple[type[Exception], ...]:
    import lzma
    import zlib

    import zstandard

    return zlib.error, lzma.LZMAError, zstandard.ZstdError


class _Placer:
    """Numbers the merged tree's new inodes, then places them (and the new directory
    listings) in the tables after the lower image's, children before their parents."""

    def __init__(self, merger: _Merge) -> None:
        lower, upper = merger.lower, merger.upper
        self.merger, self.upper = merger, upper
        self.count = lower.sb.inode_count
        self.numbers: dict[int, int] = {}  # upper ref of a non-directory → its number
        self.refs: dict[int, int] = {}  # upper ref → merged ref
        self.delta = lower.sb.inode_table - upper.data_start  # where the upper data moves
        self.first_fragment = len(lower.frags)
        self.inodes = _Table(lower.sb.dir_table - lower.sb.inode_table)
        self.listings = _Table(_table_end(lower, lower.sb.dir_table) - lower.sb.dir_table)

    def number(self, node: _Dir) -> None:
        for child in node.children.values():
            if isinstance(child, _Dir):
                self.number(child)
            elif isinstance(child, _New) and child.ref not in self.numbers:
                self.count += 1
                self.numbers[child.ref] = self.count
        self.count += 1
        node.attrs.number = self.count
        if self.count >= 1 << 32:
            raise Unmergeable("too many inodes")

    def place_new(self, item: _New) -> int:
        if item.ref not in self.refs:
            node = self.upper.inode(item.ref)
            node.uid, node.gid = self.merger.upper_id(node.uid), self.merger.upper_id(node.gid)
            node.number = self.numbers[item.ref]
            if node.kind == FILE:
                node.start += self.delta if node.blocks else 0
                if node.fragment != NO_FRAGMENT:
                    node.fragment += self.first_fragment
            block, offset = self.inodes.add(_inode_bytes(node))
            self.refs[item.ref] = (block << 16) | offset
        return self.refs[item.ref]

    def place(self, node: _Dir, parent: int) -> int:
        """Place *node* and all that is new below it; its inode's reference."""
        entries = []
        subdirs = 0
        for name in sorted(node.children):
            child = node.children[name]
            if isinstance(child, _Dir):
                entries.append((name, DIR, self.place(child, node.attrs.number),
                                child.attrs.number))
                subdirs += 1
            elif isinstance(child, _New):
                entries.append((name, child.kind, self.place_new(child),
                                self.numbers[child.ref]))
            else:
                e = child.entry
                entries.append((name, e.kind, e.ref, e.number))
                subdirs += e.kind == DIR
        listing = _listing(entries)
        block, offset = self.listings.add(listing)
        attrs = replace(node.attrs, kind=DIR, nlink=2 + subdirs, dir_block=block,
                        dir_offset=offset, dir_size=len(listing) + 3, parent=parent)
        block, offset = self.inodes.add(_inode_bytes(attrs))
        return (block << 16) | offset


def _merge(lower_file: BinaryIO, lower_offset: int, upper_file: BinaryIO, out: BinaryIO,
           cover: Cover) -> None:
    lower, upper = Image(lower_file, lower_offset), Image(upper_file)
    lsb, usb = lower.sb, upper.sb
    if (lsb.block_size, lsb.compression) != (usb.block_size, usb.compression):
        raise Unmergeable("other block sizes or compressors")
    if usb.xattr_table != NONE:  # the lower image's are kept (see _xattrs)
        raise Unmergeable("extended attributes in the new layers")
    if lower.pread(SUPER.size, lower.data_start - SUPER.size) != \
            upper.pread(SUPER.size, upper.data_start - SUPER.size):
        raise Unmergeable("other compressor options")
    merger = _Merge(lower, upper, cover)
    tree = merger.tree()
    placer = _Placer(merger)
    placer.number(tree)  # first: a directory names its parent's number
    root = placer.place(tree, placer.count + 1)

    # the lower image up to its tables, the upper data, then the tables
    out.write(bytes(SUPER.size))
    _copy(lower_file, lower_offset + SUPER.size, out, lsb.inode_table - SUPER.size)
    _copy(upper_file, upper.data_start, out, usb.inode_table - upper.data_start)
    inode_table = out.tell()
    _copy(lower_file, lower_offset + lsb.inode_table, out, placer.inodes.base)
    out.write(placer.inodes.blocks())
    dir_table = out.tell()
    _copy(lower_file, lower_offset + lsb.dir_table, out, placer.listings.base)
    out.write(placer.listings.blocks())
    frags = b"".join(lower.frags) + b"".join(
        struct.pack("<Q", struct.unpack_from("<Q", raw)[0] + placer.delta) + raw[8:]
        for raw in upper.frags)
    table, fragment_table = _indexed(frags, 16, out.tell())
    out.write(table)
    table, id_table = _indexed(b"".join(merger.ids), 4, out.tell())
    out.write(table)
    xattr_table = _xattrs(lower, out)
    end = out.tell()
    out.write(bytes(-end % 4096))
    flags = lsb.flags & ~(_EXPORTABLE | _NO_FRAGMENTS)
    sb = replace(lsb, inode_count=placer.count, mtime=usb.mtime,
                 fragments=len(lower.frags) + len(upper.frags), flags=flags,
                 id_count=len(merger.ids), root=root, bytes_used=end, id_table=id_table,
                 xattr_table=xattr_table, inode_table=inode_table, dir_table=dir_table,
                 fragment_table=fragment_table, export_table=NONE)
    out.seek(0)
    out.write(sb.pack())
    out.seek(0, os.SEEK_END)
