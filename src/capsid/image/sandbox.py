"""Sandbox directories: walking one into tar members, and telling its architecture.

The walk is sorted and keeps numeric owners, modes (setuid bits too), mtimes,
hard links, device nodes, FIFOs, symlinks and xattrs, so that a squashfs made
from it matches the directory and the same directory always gives the same
stream.
"""

from __future__ import annotations

import os
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from capsid import log
from capsid.errors import CapsidError, ImageNotFoundError

if TYPE_CHECKING:
    from capsid.image.flatten import Flattener

LOG = log.get(__name__)

_PROBES = ("bin/sh", "bin/busybox", "usr/bin/env", "bin/bash", "usr/bin/python3", "bin/true")


def check_dir(path: Path) -> None:
    if not path.exists():
        raise ImageNotFoundError(f"{path} does not exist",
                                 "give the path of a sandbox directory or an image file")
    if not path.is_dir():
        raise CapsidError(f"{path} is not a directory", "give the path of a sandbox directory")


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found = {}
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        found[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return found


def _member(name: str, path: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    info.pax_headers = _xattrs(path)
    return info


def walk(root: Path) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    """Yield (member, path of its contents or None) for everything under *root*.

    The root itself comes first as ``.``. Sockets are skipped: tar cannot hold them.
    """
    check_dir(root)
    top = str(root)
    yield _member(".", top, os.lstat(top)), None
    seen: dict[tuple[int, int], str] = {}
    stack = [("", top)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
        except PermissionError:
            raise CapsidError(f"cannot read directory {abs_dir}: permission denied",
                              "make it readable (chmod u+rx) or build as its owner") from None
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}{entry.name}"
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISSOCK(st.st_mode):
                LOG.debug("skipping socket %s", entry.path)
                continue
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                if key in seen:
                    link = tarfile.TarInfo(rel)
                    link.type, link.linkname = tarfile.LNKTYPE, seen[key]
                    link.mode, link.uid, link.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
                    link.mtime = int(st.st_mtime)
                    yield link, None
                    continue
                seen[key] = rel
            info = _member(rel, entry.path, st)
            yield info, entry.path if info.type == tarfile.REGTYPE else None
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((f"{rel}/", entry.path))
        stack.extend(reversed(subdirs))


def add_to(flat: Flattener, root: Path) -> int:
    """Add everything under *root* to *flat* as it is; return the newest mtime."""
    newest = 0
    for info, path in walk(root):
        newest = max(newest, int(info.mtime))
        if path is None:
            flat.add_member(info)
            continue
        try:
            with open(path, "rb") as f:
                flat.add_member(info, f)
        except PermissionError:
            raise CapsidError(f"cannot read {path}: permission denied",
                              "make it readable (chmod u+r) or build as its owner") from None
    return newest


def elf_arch(header: bytes) -> str | None:
    """The Go architecture name of an ELF header, or None if it is not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    little = header[5] == 1
    machine = struct.unpack_from("<H" if little else ">H", header, 18)[0]
    if machine == 21:
        return "ppc64le" if little else "ppc64"
    if machine == 8 and header[4] == 2:
        return "mips64le" if little else "mips64"
    if machine == 8:
        return "mipsle" if little else "mips"
    from capsid import arch

    found = arch.BY_ELF.get(machine)
    return found.oci if found else None


def host_arch() -> str:
    from capsid import arch

    found = arch.host()
    return found[0] if found else "unknown"


def detect_arch(root: Path) -> str:
    """The architecture of the binaries in sandbox *root*; the host's if none is found."""
    from capsid import inroot

    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for probe in _PROBES:
            fd = inroot.open_file(root_fd, probe)
            if fd is None:
                continue
            try:
                arch = elf_arch(os.pread(fd, 64, 0))
            except OSError:
                continue
            finally:
                os.close(fd)
            if arch:
                return arch
    finally:
        os.close(root_fd)
    return host_arch()
