"""What capsid needs to know of an ELF file, read straight from its headers.

The machine and class (to pick the host's libraries a container can load), the
libraries it needs with their search path (``DT_NEEDED``, ``DT_RUNPATH``), the symbol
versions it needs (``GLIBC_2.34``: will the image's C library load it?) or defines
(the version of a ``libc.so.6``), and the x86-64 ISA level it declares.

Written here rather than taken from pyelftools: importing that costs about 45 ms, and
these reads sit on the start of every ``--nv`` container, where four fields are needed.
"""

from __future__ import annotations

import mmap
import os
import struct

_SHT_DYNAMIC, _SHT_VERDEF, _SHT_VERNEED = 6, 0x6FFFFFFD, 0x6FFFFFFE
_DT_NEEDED, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 1, 14, 15, 29
_PT_GNU_PROPERTY = 0x6474E553
_ISA_NEEDED = 0xC0008002  #: GNU_PROPERTY_X86_ISA_1_NEEDED


class NotELF(ValueError):
    """The file is not an ELF object capsid can read."""


class Info:
    """What one ELF file says about itself (a plain class: this is read as containers
    start, where importing dataclasses costs milliseconds)."""

    __slots__ = ("elf_class", "machine", "needed", "runpath", "soname", "version_defs",
                 "version_needs")

    def __init__(self, elf_class: int, machine: int) -> None:
        self.elf_class = elf_class  #: 1 = 32-bit, 2 = 64-bit
        self.machine = machine  #: e_machine (62 = x86-64, 183 = AArch64, ...)
        self.needed: list[str] = []  #: DT_NEEDED sonames
        self.soname: str | None = None
        self.runpath: list[str] = []  #: DT_RUNPATH, else DT_RPATH
        self.version_needs: dict[str, set[str]] = {}  #: library → versions needed from it
        self.version_defs: set[str] = set()

    def newest_glibc(self) -> tuple[int, ...] | None:
        """The newest ``GLIBC_x.y`` this file needs from the C library, or None."""
        found = [v for names in self.version_needs.values() for n in names
                 if (v := glibc_version(n)) is not None]
        return max(found) if found else None


def glibc_version(name: str) -> tuple[int, ...] | None:
    """``GLIBC_2.34`` → (2, 34); anything else → None."""
    parts = name[6:].split(".") if name.startswith("GLIBC_") else []
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def header(path: str) -> tuple[int, int] | None:
    """(class, machine) of an ELF file, or None when it is not one (or cannot be read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    machine, = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)
    return head[4], machine


def this_machine() -> tuple[int, int]:
    """(class, machine) of the running interpreter: what this host loads natively."""
    found = header("/proc/self/exe")
    if found is None:  # pragma: no cover - /proc is always mounted where capsid runs
        import sys

        found = header(os.path.realpath(sys.executable)) or (2, 62)
    return found


def read(path: str | int) -> Info:
    """The headers of the ELF file at *path*, or open as file descriptor *path* (which
    stays open); raises :class:`NotELF` or OSError."""
    with open(path, "rb", closefd=not isinstance(path, int)) as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise NotELF(f"{path} is empty") from None
        try:
            return _parse(data, path)
        except NotELF:
            raise
        except (struct.error, IndexError, ValueError, OverflowError) as err:
            raise NotELF(f"{path}: damaged ELF headers ({err})") from None
        finally:
            data.close()


def _parse(data: mmap.mmap, path: str | int) -> Info:
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise NotELF(f"{path} is not an ELF file")
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    machine, = struct.unpack_from(order + "H", data, 18)
    info = Info(elf_class=data[4], machine=machine)
    if wide:
        shoff, = struct.unpack_from(order + "Q", data, 40)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 58)
        section = order + "IIQQQQIIQQ"
    else:
        shoff, = struct.unpack_from(order + "I", data, 32)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 46)
        section = order + "IIIIIIIIII"
    sections = [struct.unpack_from(section, data, shoff + i * shentsize)
                for i in range(shnum)] if shoff else []

    def strings(index: int) -> bytes:
        entry = sections[index]
        return bytes(data[entry[4]:entry[4] + entry[5]])

    def text(table: bytes, offset: int) -> str:
        return table[offset:table.index(b"\0", offset)].decode(errors="replace")

    for entry in sections:
        kind, offset, size, link = entry[1], entry[4], entry[5], entry[6]
        if kind == _SHT_DYNAMIC:
            table, step = strings(link), (16 if wide else 8)
            runpath: list[str] = []
            rpath: list[str] = []
            for pos in range(offset, offset + size - step + 1, step):
                tag, value = struct.unpack_from(order + ("qQ" if wide else "iI"), data, pos)
                if tag == 0:
                    break
                if tag == _DT_NEEDED:
                    info.needed.append(text(table, value))
                elif tag == _DT_SONAME:
                    info.soname = text(table, value)
                elif tag == _DT_RUNPATH:
                    runpath += text(table, value).split(":")
                elif tag == _DT_RPATH:
                    rpath += text(table, value).split(":")
            info.runpath = [p for p in runpath or rpath if p]
        elif kind == _SHT_VERNEED:
            table, pos = strings(link), offset
            for _ in range(entry[7] or 0x10000):  # sh_info: the number of entries
                _version, count, file_name, aux, next_ = struct.unpack_from(
                    order + "HHIII", data, pos)
                names = info.version_needs.setdefault(text(table, file_name), set())
                apos = pos + aux
                for _ in range(count):
                    _hash, _flags, _other, name, anext = struct.unpack_from(
                        order + "IHHII", data, apos)
                    names.add(text(table, name))
                    apos += anext
                if not next_:
                    break
                pos += next_
        elif kind == _SHT_VERDEF:
            table, pos = strings(link), offset
            for _ in range(entry[7] or 0x10000):
                _version, _flags, _ndx, count, _hash, aux, next_ = struct.unpack_from(
                    order + "HHHHIII", data, pos)
                if count:
                    name, = struct.unpack_from(order + "I", data, pos + aux)
                    info.version_defs.add(text(table, name))
                if not next_:
                    break
                pos += next_
    return info


def isa_level(data: bytes) -> int:
    """The x86-64 ISA level (1-4) an ELF file's GNU property note says it needs, or 0."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return 0
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    needed = 0
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(data):
            break
        p_type, = struct.unpack_from("<I", data, base)
        if p_type != _PT_GNU_PROPERTY:
            continue
        offset, = struct.unpack_from("<Q", data, base + 8)
        size, = struct.unpack_from("<Q", data, base + 32)
        note = data[offset:offset + size]
        if len(note) < 16:
            continue
        namesz, descsz, _kind = struct.unpack_from("<III", note, 0)
        desc = note[12 + ((namesz + 3) & ~3):][:descsz]
        pos = 0
        while pos + 8 <= len(desc):
            pr_type, pr_size = struct.unpack_from("<II", desc, pos)
            if pr_type == _ISA_NEEDED and pr_size >= 4:
                bits, = struct.unpack_from("<I", desc, pos + 8)
                needed = max(needed, bits.bit_length())
            pos += 8 + ((pr_size + 7) & ~7)
    return needed
