"""Reading programs ahead: ELF interpreters, and paths resolved inside an image root."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from capsid import inroot
from capsid.runtime import prefetch


def _elf(interp: bytes | None) -> bytes:
    """A minimal little-endian 64-bit ELF header with one program header."""
    phoff, phnum = 64, 1
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[32:40] = phoff.to_bytes(8, "little")
    header[54:56] = (56).to_bytes(2, "little")
    header[56:58] = phnum.to_bytes(2, "little")
    data = interp + b"\0" if interp is not None else b""
    kind = 3 if interp is not None else 1  # PT_INTERP or PT_LOAD
    program = struct.pack("<IIQQQQQQ", kind, 4, 120, 0, 0, len(data), len(data), 1)
    return bytes(header) + program + data


def test_elf_interpreter_of_dynamic_and_static_programs() -> None:
    assert prefetch.elf_interpreter(_elf(b"/lib64/ld-linux-x86-64.so.2")) == \
        "/lib64/ld-linux-x86-64.so.2"
    assert prefetch.elf_interpreter(_elf(None)) is None
    assert prefetch.elf_interpreter(b"#!/bin/sh\necho hi\n") is None
    assert prefetch.elf_interpreter(_elf(b"/lib/ld.so")[:100]) is None  # cut short


def test_elf_interpreter_of_a_real_program() -> None:
    sh = shutil.which("ls")
    assert sh is not None
    with open(sh, "rb") as f:
        interp = prefetch.elf_interpreter(f.read(4096))
    assert interp is not None and os.path.exists(interp)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image-like tree whose symlinks only make sense inside it."""
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "busybox").write_bytes(b"real")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "usr" / "bin" / "sh").symlink_to("busybox")
    (tmp_path / "usr" / "bin" / "abs").symlink_to("/usr/bin/busybox")
    (tmp_path / "usr" / "bin" / "up").symlink_to("../../../../usr/bin/busybox")
    (tmp_path / "usr" / "bin" / "loop").symlink_to("loop")
    return tmp_path


def _read(root: Path, path: str) -> bytes | None:
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = inroot.open_file(root_fd, path)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read()
    finally:
        os.close(root_fd)


def test_paths_resolve_inside_the_root(root: Path) -> None:
    assert _read(root, "/bin/sh") == b"real"        # relative links, a linked directory
    assert _read(root, "/usr/bin/abs") == b"real"   # an absolute link stays in the root
    assert _read(root, "/usr/bin/up") == b"real"    # .. never climbs out of the root
    assert _read(root, "/usr/bin/missing") is None
    assert _read(root, "/usr/bin/loop") is None


def test_only_regular_files_are_read_ahead(root: Path) -> None:
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        seen: set[tuple[int, int]] = set()
        assert inroot.open_file(root_fd, "/bin") is None  # only files are opened
        directory = os.open(root / "bin", os.O_RDONLY)
        assert prefetch._read_ahead(directory, seen) == (None, []) and seen == set()
        program = inroot.open_file(root_fd, "/bin/sh")
        assert program is not None
        prefetch._read_ahead(program, seen)
        assert len(seen) == 1
    finally:
        os.close(root_fd)


def test_needed_libraries_of_a_real_program() -> None:
    """The names match what the section headers say (capsid.elf reads those)."""
    from capsid import elf

    program = os.path.realpath(shutil.which("ls") or "/bin/ls")
    fd = os.open(program, os.O_RDONLY)
    try:
        needed = prefetch.needed_libraries(fd, os.pread(fd, 4096, 0))
    finally:
        os.close(fd)
    assert "libc.so.6" in needed
    assert needed == elf.read(program).needed


def test_needed_libraries_of_damaged_programs() -> None:
    assert prefetch.needed_libraries(-1, _elf(None)) == []  # no PT_DYNAMIC: not read at all
    dynamic = _elf(None).replace(b"\x01\x00\x00\x00\x04", b"\x02\x00\x00\x00\x04", 1)
    with pytest.raises(OSError):  # a PT_DYNAMIC that cannot be read: _read_ahead ignores it
        prefetch.needed_libraries(-1, dynamic)


def test_the_libraries_of_a_dynamic_program_are_read_ahead(tmp_path: Path) -> None:
    """The loader and each library a program names, from the loader's directory."""
    ls = os.path.realpath(shutil.which("ls") or "/bin/ls")
    with open(ls, "rb") as f:
        interp = prefetch.elf_interpreter(f.read(4096))
    assert interp is not None
    libdir = tmp_path / "usr" / "lib" / "multiarch"
    libdir.mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    shutil.copy(ls, tmp_path / "bin" / "ls")
    (tmp_path / interp.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (libdir / "ld.so").write_bytes(b"loader")
    (tmp_path / interp.lstrip("/")).symlink_to("/usr/lib/multiarch/ld.so")
    for name in ("libc.so.6", "libunrelated.so.1"):
        (libdir / name).write_bytes(name.encode())
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    seen: set[tuple[int, int]] = set()
    try:
        program = inroot.open_file(root_fd, "/bin/ls")
        assert program is not None
        found_interp, needed = prefetch._read_ahead(program, seen)
        assert found_interp == interp and "libc.so.6" in needed
        prefetch._libraries(root_fd, found_interp, needed, seen)
    finally:
        os.close(root_fd)
    read = {path.name for path in libdir.iterdir()
            if (path.stat().st_dev, path.stat().st_ino) in seen}
    assert read == {"ld.so", "libc.so.6"}  # libunrelated.so.1 is not needed by ls


def test_prefetch_of_a_missing_program_is_harmless(root: Path) -> None:
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    prefetch._run(root_fd, ["nothing-here", "/bin/sh", "sh"])  # closes root_fd
    with pytest.raises(OSError):
        os.fstat(root_fd)
