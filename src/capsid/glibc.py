"""The C library of images: which glibc an image has, and where its loader looks.

Host libraries bound into a container (GPU drivers, the host's MPI) load only where the
image's glibc is at least as new as the newest ``GLIBC_x.y`` they need.
"""

from __future__ import annotations

import os

from capsid import arch, elf


def libc_candidates(machine: int) -> list[str]:
    triplet = arch.triplet(machine)
    return [f"{d}/libc.so.6" for d in (f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64",
                                       "/usr/lib64", "/lib", "/usr/lib") if d]


def glibc_of(info: elf.Info) -> tuple[int, ...] | None:
    """The glibc version a ``libc.so.6`` defines (its newest GLIBC_x.y)."""
    found = [v for n in info.version_defs if (v := elf.glibc_version(n)) is not None]
    return max(found) if found else None


def image_glibc(root_fd: int) -> tuple[int, ...] | None:
    """The glibc version of the image under *root_fd*; None if it has none (musl, static)."""
    from capsid import inroot

    for path in libc_candidates(elf.this_machine()[1]):
        fd = inroot.open_file(root_fd, path)
        if fd is None:
            continue
        try:
            return glibc_of(elf.read(fd))
        except (OSError, elf.NotELF):
            continue
        finally:
            os.close(fd)
    return None


def image_library_dirs(root_fd: int) -> list[str]:
    """The directories the image's dynamic loader searches: its ld.so.conf (with the
    files it includes) and the standard ones."""
    from capsid import inroot

    dirs: list[str] = []

    def read(path: str, depth: int) -> None:
        fd = inroot.open_file(root_fd, path)
        if fd is None:
            return
        with open(fd, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if line.startswith("include") and depth < 3:
                for pattern in line.split()[1:]:
                    if not pattern.startswith("/"):
                        pattern = os.path.join(os.path.dirname(path), pattern)
                    for each in _glob_in(root_fd, pattern):
                        read(each, depth + 1)
            elif line.startswith("/") and line not in dirs:
                dirs.append(line)

    read("/etc/ld.so.conf", 0)
    triplet = arch.triplet(elf.this_machine()[1])
    for standard in (f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64", "/usr/lib64",
                     "/lib", "/usr/lib"):
        if standard not in dirs:
            dirs.append(standard)
    return dirs


def _glob_in(root_fd: int, pattern: str) -> list[str]:
    """The files matching *pattern* (``*`` wildcards in its last part only) in the root."""
    from capsid import inroot

    directory, wanted = os.path.split(pattern)
    try:
        with inroot.walk(root_fd, directory) as found:
            if found.missing:
                return []
            fd = found.reopen(os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
    except (OSError, inroot.Unresolvable):
        return []
    return [f"{directory}/{n}" for n in sorted(names) if _matches(n, wanted)]


def _matches(name: str, pattern: str) -> bool:
    """Shell-style ``*`` matching: fnmatch would need ``re`` after the container's root
    has hidden the standard library."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return name == pattern
    if not (name.startswith(pieces[0]) and name.endswith(pieces[-1])) or \
            len(name) < len(pieces[0]) + len(pieces[-1]):
        return False
    position = len(pieces[0])
    for piece in pieces[1:-1]:
        found = name.find(piece, position, len(name) - len(pieces[-1]))
        if found < 0:
            return False
        position = found + len(piece)
    return True
