"""Flatten OCI layers into one tar stream, newest layer first, without unpacking.

The OCI image spec's rules, applied while streaming:

- a path already written by a newer layer hides the same path in older ones;
- ``.wh.NAME`` hides ``NAME`` (and all below it) in older layers, and
  ``.wh..wh..opq`` hides everything older below its directory;
- a non-directory in a newer layer hides everything older below its path;
- hard links may point into older layers, so they are written last, and only
  when their target made it into the image.

Headers are parsed by hand from 512-byte blocks and, when nothing needs
changing, copied through byte for byte with their data, so the cost is a copy
rather than a tarfile round trip. Names with ``..`` components are dropped and
absolute names made relative; extension headers are size-limited. The output
only ever feeds ``tar2sqfs``, so no entry can touch the host filesystem.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from capsid import log
from capsid.errors import ImageFormatError

LOG = log.get(__name__)

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
#: Largest pax or GNU long-name header accepted; real ones are a few hundred bytes.
MAX_EXTENSION = 1 << 20
_REGULAR = (b"0", b"\0", b"7")
_HAS_DATA_UNKNOWN = (b"0", b"\0", b"7", b"S")
_KNOWN = (b"1", b"2", b"3", b"4", b"5", b"6")
_PAX, _GLOBAL, _LONGNAME, _LONGLINK = b"x", b"g", b"L", b"K"


class LayerError(ImageFormatError):
    """A layer is not a valid tar stream."""


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            raise LayerError("a layer has a negative number in a tar header",
                             "the layer is damaged; rebuild the image")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise LayerError("a layer has a tar header with a bad number field",
                         "the layer is damaged; rebuild the image") from None


def _pax_number(value: str, key: str) -> int:
    """A pax record's decimal number (``size``): digits only, as POSIX requires."""
    if not value.isascii() or not value.isdigit():
        raise LayerError(f"a layer has a pax header with {key}={value[:40]!r}, not a number",
                         "the layer is damaged; rebuild the image")
    return int(value)


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == computed


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise LayerError("a layer has a malformed pax header",
                             "the layer is damaged; rebuild the image") from None
        if length <= 0 or pos + length > len(data):
            raise LayerError("a layer has a malformed pax header",
                             "the layer is damaged; rebuild the image")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _pax_block(records: dict[str, str]) -> bytes:
    """A pax extended header (header block plus data) holding *records*."""
    body = bytearray()
    for key, value in records.items():
        item = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        n = len(item) + 1
        while len(str(n)) + len(item) != n:
            n = len(str(n)) + len(item)
        body += str(n).encode() + item
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return header + bytes(body) + bytes(_padded(len(body)) - len(body))


def normalize(name: str) -> str | None:
    """*name* as a relative path without ``.`` or empty parts; None if it has ``..``."""
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        return None
    return "/".join(parts)


class _Reader:
    """Exact-size reads and pass-through copies over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = b""
        self._pos = 0

    def _more(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                rest = self._buf[self._pos:]
                self._buf = rest + chunk if rest else bytes(chunk)
                self._pos = 0
                return True
        return False

    def read(self, n: int) -> bytes | None:
        """Exactly *n* bytes, or None at a clean end of stream."""
        while len(self._buf) - self._pos < n:
            if not self._more():
                if self._pos == len(self._buf):
                    return None
                raise _truncated()
        data = self._buf[self._pos:self._pos + n]
        self._pos += n
        return data

    def copy(self, n: int, write: Callable[[memoryview], object] | None) -> None:
        """Pass *n* bytes to *write* (or drop them if it is None)."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._more():
                    raise _truncated()
                continue
            take = min(avail, n)
            if write is not None:
                write(memoryview(self._buf)[self._pos:self._pos + take])
            self._pos += take
            n -= take

    def drain(self) -> None:
        """Consume the rest of the stream (so a digest over it completes)."""
        self._buf, self._pos = b"", 0
        for _ in self._chunks:
            pass


def _truncated() -> LayerError:
    return LayerError("a layer ends in the middle of a tar entry",
                      "the download or archive is incomplete; pull or save it again")


class Flattener:
    """Writes the union of layers, given newest first, as one tar stream."""

    def __init__(self, write: Callable[[bytes | memoryview], object]) -> None:
        self._write = write
        self._seen: dict[str, bool] = {}  # path → is a directory
        self._hidden: set[str] = set()  # whited-out paths (and all below)
        self._opaque: set[str] = set()  # directories whose older contents are hidden
        self._implied: set[str] = set()  # parents of written paths that no entry made yet
        self._links: list[tuple[str, str, bytes]] = []  # (path, target, header blocks)
        self._made: set[str] = set()  # directories written with an entry of their own
        self.skipped: list[str] = []
        self.unlinked: list[str] = []  #: hard links left out: their targets are not here

    # -- visibility ---------------------------------------------------------------------

    def visible(self, path: str) -> bool:
        """Whether an older layer's *path* still shows through the newer ones."""
        if path in self._seen or path in self._hidden:
            return False
        start = 0
        while True:
            slash = path.find("/", start)
            if slash < 0:
                return True
            parent = path[:slash]
            if parent in self._hidden or parent in self._opaque:
                return False
            if self._seen.get(parent) is False:
                return False  # a newer non-directory sits where this path's parent was
            start = slash + 1

    def _root_visible(self, path: str) -> bool:
        return path == "" and "" not in self._seen

    # -- entries made by capsid ---------------------------------------------------------

    def add_member(self, info: tarfile.TarInfo, data: bytes | BinaryIO = b"") -> bool:
        """Add one entry taken literally (no whiteouts): metadata capsid generates, or
        a file of a directory tree with its open file (``info.size`` bytes of it are
        written). False if the layers already have it."""
        path = normalize(info.name)
        if path is None or not (self.visible(path) if path else self._root_visible(path)):
            return False
        self._seen[path] = info.isdir()
        if info.isdir():
            self._made.add(path)
        parent = path.rpartition("/")[0]
        while parent:  # so no layer can put a file where these entries need a directory
            self._seen.setdefault(parent, True)
            parent = parent.rpartition("/")[0]
        if isinstance(data, bytes):
            info.size = len(data) if info.isreg() else 0
            self._write(info.tobuf(tarfile.PAX_FORMAT))
            if data:
                self._write(data + bytes(_padded(len(data)) - len(data)))
            return True
        self._write(info.tobuf(tarfile.PAX_FORMAT))
        left = info.size
        while left:
            chunk = data.read(min(left, 1 << 20))
            if not chunk:  # the file shrank while read: pad, the header said its size
                chunk = bytes(min(left, 1 << 20))
            self._write(chunk)
            left -= len(chunk)
        self._write(bytes(_padded(info.size) - info.size))
        return True

    # -- layers -------------------------------------------------------------------------

    def add_layer(self, chunks: Iterable[bytes], label: str = "layer") -> None:
        """Add one layer's tar stream (decompressed chunks), older than all added so far."""
        reader = _Reader(chunks)
        whiteouts: list[str] = []
        opaque: list[str] = []
        layer_seen: set[str] = set()
        write = self._write
        while True:
            ext = bytearray()
            pax: dict[str, str] = {}
            longname = longlink = None
            while True:
                block = reader.read(BLOCK)
                if block is None or block == ZERO_BLOCK:
                    break
                if not _checksum_ok(block):
                    raise LayerError(f"{label} is not a valid tar stream (bad header checksum)",
                                     "the layer is damaged or not a tar archive")
                kind = block[156:157]
                if kind not in (_PAX, _GLOBAL, _LONGNAME, _LONGLINK):
                    break
                size = _number(block[124:136])
                if size > MAX_EXTENSION:
                    raise LayerError(f"{label} has a {size}-byte extended tar header",
                                     "the layer is hostile or damaged; do not use this image")
                body = reader.read(_padded(size))
                if body is None:
                    raise _truncated()
                data = body[:size]
                if kind == _PAX:
                    pax.update(_parse_pax(data))
                elif kind == _LONGNAME:
                    longname = _cstr(data)
                elif kind == _LONGLINK:
                    longlink = _cstr(data)
                if kind != _GLOBAL:
                    ext += block + body
            if block is None or block == ZERO_BLOCK:
                break
            kind = block[156:157]
            size = _pax_number(pax["size"], "size") if "size" in pax \
                else _number(block[124:136])
            has_data = kind in _HAS_DATA_UNKNOWN or kind not in _KNOWN
            if "path" in pax:
                name = pax["path"]
            elif longname is not None:
                name = longname
            else:
                name = _cstr(block[0:100])
                if block[257:262] == b"ustar" and block[345:346] != b"\0":
                    name = _cstr(block[345:500]) + "/" + name
            data_size = _padded(size) if has_data else 0

            path = normalize(name)
            base = path.rsplit("/", 1)[-1] if path else ""
            keep = True
            if path is None:
                self._skip(f"{label}: {name!r} (leaves the image root)")
                keep = False
            elif base.startswith(WHITEOUT):
                parent = path.rpartition("/")[0]
                if base == OPAQUE:
                    opaque.append(parent)
                else:
                    whiteouts.append(f"{parent}/{base[4:]}" if parent else base[4:])
                keep = False
            elif path in layer_seen:
                keep = False  # duplicate inside one layer: the first copy stands
            elif not (self.visible(path) if path else self._root_visible(path)):
                keep = False
            elif path in self._implied and kind != b"5":
                # A newer layer has entries below this path, so it is a directory there
                # (as in Docker's overlay storage, where the newer directory hides it).
                self._skip(f"{label}: {name!r} (a newer layer has a directory there)")
                keep = False
            if not keep:
                reader.copy(data_size, None)
                continue
            assert path is not None
            layer_seen.add(path)
            rewrite: dict[str, str] = {}
            if name.startswith("/"):
                rewrite["path"] = path or "."
            if not has_data and size:
                rewrite["size"] = "0"
            if kind == b"1":
                target_raw = pax.get("linkpath") or longlink or _cstr(block[157:257])
                target = normalize(target_raw)
                if not target or target == path:
                    self._skip(f"{label}: hard link {name!r} → {target_raw!r}")
                    reader.copy(data_size, None)
                    continue
                if target_raw != target:
                    rewrite["linkpath"] = target
                self._seen[path] = False
                self._imply_parents(path)
                headers = self._headers(ext, pax, block, rewrite)
                body = reader.read(data_size) if data_size else None
                self._links.append((path, target, headers + (body or b"")))
                continue
            self._seen[path] = kind == b"5"
            if kind == b"5":
                self._made.add(path)
            self._imply_parents(path)
            write(self._headers(ext, pax, block, rewrite))
            reader.copy(data_size, write)
        reader.drain()
        self._hidden.update(whiteouts)
        self._opaque.update(opaque)

    def _imply_parents(self, path: str) -> None:
        """Record that *path*'s parents must be directories, unless an entry made them."""
        self._implied.discard(path)
        parent = path.rpartition("/")[0]
        while parent and parent not in self._seen and parent not in self._implied:
            self._implied.add(parent)
            parent = parent.rpartition("/")[0]

    @staticmethod
    def _headers(ext: bytearray, pax: dict[str, str], block: bytes,
                 rewrite: dict[str, str]) -> bytes:
        if not rewrite:
            return bytes(ext) + block
        records = {**pax, **rewrite}
        return _pax_block(records) + block

    def _skip(self, what: str) -> None:
        self.skipped.append(what)
        LOG.warning("skipping %s", what)

    def finish(self) -> None:
        """Write the hard links whose targets exist, then the end-of-archive marker."""
        files = {p for p, is_dir in self._seen.items() if not is_dir}
        links = {path: target for path, target, _ in self._links}
        for path, target, raw in self._links:
            seen: set[str] = set()
            while target in links and target not in seen:
                seen.add(target)
                target = links[target]
            if target in files and target not in links:
                self._write(raw)
            else:
                self.unlinked.append(path)
                self._skip(f"hard link {path!r}: its target is not in the image")
        self._write(ZERO_BLOCK * 2)

    def cover(self) -> Cover:
        """What the layers added so far do to an older image that was not streamed
        here, once :meth:`finish` wrote them: the image they are laid over."""
        return Cover(frozenset(self._hidden), frozenset(self._opaque),
                     frozenset(self._made), tuple(self.unlinked))


@dataclass(frozen=True)
class Cover:
    """Layers as a cover over an older image (see :mod:`capsid.image.sqmerge`)."""

    hidden: frozenset[str]  #: whited-out paths: gone, with all below them
    opaque: frozenset[str]  #: directories whose older contents are gone
    made: frozenset[str]  #: directories with entries of their own (others only hold entries)
    unlinked: tuple[str, ...]  #: hard links to older files, which a cover cannot keep

