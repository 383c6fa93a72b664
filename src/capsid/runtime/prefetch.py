"""Reading the programs a container starts ahead of time, while it is being set up.

Through FUSE a program's pages arrive as it faults on them: one round trip to
squashfuse per 128 KiB, at offsets that rarely match the squashfs blocks, so most
blocks are decompressed twice, and all of it waits on the program. Asking the
kernel for the whole file in aligned 128 KiB pieces (``POSIX_FADV_WILLNEED``)
from a background thread has squashfuse decompress each block once, while the
main thread mounts binds; the program then starts from the page cache.

It is only a hint: every failure is ignored, and ``execve`` ends the thread.
Paths are resolved against a directory fd of the image root, so symlinks resolve
inside the image and the thread keeps working across ``pivot_root``.
"""

from __future__ import annotations

import _thread
import os
import stat

from capsid import inroot

#: Pieces the kernel asks FUSE for at a time (its readahead window).
_PIECE = 128 * 1024
#: Never read more than this of one file: a program's start touches far less.
_MAX_BYTES = 32 * 1024 * 1024
_SEARCH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def start(root_fd: int, programs: list[str]) -> None:
    """Read *programs* (paths or bare names) of the image whose root is *root_fd* ahead.

    The thread takes *root_fd* over and closes it.
    """
    _thread.start_new_thread(_run, (root_fd, programs))


def _run(root_fd: int, programs: list[str]) -> None:
    seen: set[tuple[int, int]] = set()
    try:
        for program in programs:
            for path in _candidates(program):
                fd = inroot.open_file(root_fd, path)
                if fd is not None:
                    interpreter, needed = _read_ahead(fd, seen)
                    if interpreter:
                        _libraries(root_fd, interpreter, needed, seen)
                    break
    except Exception:  # a hint must never break the container
        pass
    finally:
        os.close(root_fd)


def _libraries(root_fd: int, interpreter: str, needed: list[str],
               seen: set[tuple[int, int]]) -> None:
    """Read ahead the dynamic loader and the libraries a program names, looked for in
    the loader's own directory (where the C library and its peers lie in every
    distribution's layout); the loader finds the rest itself, from the page cache or not."""
    with inroot.walk(root_fd, interpreter) as found:
        if found.missing or not found.trail:
            return
        fd = found.reopen(os.O_RDONLY | os.O_NONBLOCK)
        folder = found.inside.rpartition("/")[0]
    _read_ahead(fd, seen)
    for name in needed:
        if "/" not in name:
            lib = inroot.open_file(root_fd, f"{folder}/{name}")
            if lib is not None:
                _read_ahead(lib, seen)


def _candidates(program: str) -> list[str]:
    return [program] if "/" in program else [f"{d}/{program}" for d in _SEARCH]


def _read_ahead(fd: int, seen: set[tuple[int, int]]) -> tuple[str | None, list[str]]:
    """Ask for all of the file behind *fd*; return its ELF interpreter, if any, and the
    libraries it needs."""
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if not stat.S_ISREG(info.st_mode) or key in seen:
            return None, []
        seen.add(key)
        for offset in range(0, min(info.st_size, _MAX_BYTES), _PIECE):
            os.posix_fadvise(fd, offset, _PIECE, os.POSIX_FADV_WILLNEED)
        head = os.pread(fd, 4096, 0)
        interpreter = elf_interpreter(head)
        return interpreter, needed_libraries(fd, head) if interpreter else []
    except (OSError, ValueError, IndexError):
        return None, []
    finally:
        os.close(fd)


def elf_interpreter(head: bytes) -> str | None:
    """The PT_INTERP path of a little-endian 64-bit ELF file starting with *head*."""
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    for kind, offset, _, size in _segments(head):
        if kind == 3:  # PT_INTERP
            if offset + size > len(head):
                return None
            return head[offset:offset + size].rstrip(b"\0").decode(errors="replace")
    return None


def _segments(head: bytes) -> list[tuple[int, int, int, int]]:
    """(type, file offset, address, size in the file) of each program header in *head*
    (a little-endian 64-bit ELF file's first bytes)."""
    phoff = int.from_bytes(head[32:40], "little")
    entsize = int.from_bytes(head[54:56], "little")
    found = []
    for index in range(int.from_bytes(head[56:58], "little")):
        entry = phoff + index * entsize
        if entry + 56 > len(head):
            break
        found.append((int.from_bytes(head[entry:entry + 4], "little"),
                      int.from_bytes(head[entry + 8:entry + 16], "little"),
                      int.from_bytes(head[entry + 16:entry + 24], "little"),
                      int.from_bytes(head[entry + 32:entry + 40], "little")))
    return found


def needed_libraries(fd: int, head: bytes) -> list[str]:
    """The ``DT_NEEDED`` names of the ELF file open as *fd* (whose first bytes are
    *head*), read through its program headers: the section headers lie at the end
    of the file, the dynamic section next to these."""
    segments = _segments(head)
    dynamic = next(((offset, size) for kind, offset, _, size in segments if kind == 2), None)
    if dynamic is None:
        return []
    table = os.pread(fd, min(dynamic[1], 1 << 16), dynamic[0])
    needed, strtab, strsz = [], 0, 1 << 16
    for at in range(0, len(table) - 15, 16):
        tag = int.from_bytes(table[at:at + 8], "little")
        value = int.from_bytes(table[at + 8:at + 16], "little")
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED: an offset into the string table
            needed.append(value)
        elif tag == 5:  # DT_STRTAB: an address
            strtab = value
        elif tag == 10:  # DT_STRSZ
            strsz = min(value, 1 << 16)
    where = next((offset + strtab - address for kind, offset, address, size in segments
                  if kind == 1 and address <= strtab < address + size), None)
    if where is None or not needed:
        return []
    strings = os.pread(fd, strsz, where)
    return [strings[at:strings.find(b"\0", at)].decode(errors="replace")
            for at in needed if at < len(strings)]
