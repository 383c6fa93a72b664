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
                    interpreter = _read_ahead(fd, seen)
                    if interpreter:
                        interp_fd = inroot.open_file(root_fd, interpreter)
                        if interp_fd is not None:
                            _read_ahead(interp_fd, seen)
                    break
    except Exception:  # a hint must never break the container
        pass
    finally:
        os.close(root_fd)


def _candidates(program: str) -> list[str]:
    return [program] if "/" in program else [f"{d}/{program}" for d in _SEARCH]


def _read_ahead(fd: int, seen: set[tuple[int, int]]) -> str | None:
    """Ask for all of the file behind *fd*; return its ELF interpreter, if any."""
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if not stat.S_ISREG(info.st_mode) or key in seen:
            return None
        seen.add(key)
        for offset in range(0, min(info.st_size, _MAX_BYTES), _PIECE):
            os.posix_fadvise(fd, offset, _PIECE, os.POSIX_FADV_WILLNEED)
        return elf_interpreter(os.pread(fd, 4096, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def elf_interpreter(head: bytes) -> str | None:
    """The PT_INTERP path of a little-endian 64-bit ELF file starting with *head*."""
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    phoff = int.from_bytes(head[32:40], "little")
    entsize = int.from_bytes(head[54:56], "little")
    for index in range(int.from_bytes(head[56:58], "little")):
        entry = phoff + index * entsize
        if entry + 56 > len(head):
            return None
        if int.from_bytes(head[entry:entry + 4], "little") == 3:  # PT_INTERP
            offset = int.from_bytes(head[entry + 8:entry + 16], "little")
            size = int.from_bytes(head[entry + 32:entry + 40], "little")
            if offset + size > len(head):
                return None
            return head[offset:offset + size].rstrip(b"\0").decode(errors="replace")
    return None
