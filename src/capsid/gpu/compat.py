"""Will the host's driver load in this image? Apptainer's most reported GPU failure,
caught before the command starts.

Host libraries built against a newer glibc than the image's fail at run time with
``version `GLIBC_2.34' not found (required by /.singularity.d/libs/libGLdispatch.so.0)``.
Each library's ELF version needs say which glibc it wants; the image's ``libc.so.6``
says which glibc it is. The same facts, plus the driver's and the image's CUDA
versions, feed ``capsid doctor``.
"""

from __future__ import annotations

import os
import re

from capsid import elf, log

LOG = log.get(__name__)

#: where a C library lies in an image, by ELF machine
_TRIPLETS = {62: "x86_64-linux-gnu", 183: "aarch64-linux-gnu", 21: "powerpc64le-linux-gnu",
             22: "s390x-linux-gnu", 3: "i386-linux-gnu", 243: "riscv64-linux-gnu"}

#: the first Linux driver of each CUDA release (NVIDIA's CUDA release notes, table 3)
CUDA_DRIVERS = (
    ((13, 0), "580.65.06"), ((12, 9), "575.51.03"), ((12, 8), "570.26"),
    ((12, 6), "560.28.03"), ((12, 5), "555.42.02"), ((12, 4), "550.54.14"),
    ((12, 3), "545.23.06"), ((12, 2), "535.54.03"), ((12, 1), "530.30.02"),
    ((12, 0), "525.60.13"), ((11, 8), "520.61.05"), ((11, 7), "515.43.04"),
    ((11, 6), "510.39.01"), ((11, 5), "495.29.05"), ((11, 4), "470.42.01"),
    ((11, 3), "465.19.01"), ((11, 2), "460.27.03"), ((11, 1), "455.23"),
    ((11, 0), "450.36.06"), ((10, 2), "440.33"), ((10, 1), "418.39"),
    ((10, 0), "410.48"), ((9, 2), "396.26"), ((9, 1), "390.46"), ((9, 0), "384.81"),
)
#: the oldest driver of each CUDA major version that runs its later minor versions
#: (CUDA's "minor version compatibility"; features of the newer driver may be missing)
CUDA_MINOR_COMPAT = {13: (580, 0), 12: (525, 60, 13), 11: (450, 80, 2)}


def library_needs(libraries: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Library name → the newest glibc version its host file needs (those that say)."""
    needs = {}
    for name, path in libraries.items():
        try:
            newest = elf.read(path).newest_glibc()
        except (OSError, elf.NotELF) as err:
            LOG.debug("cannot read %s: %s", path, err)
            continue
        if newest is not None:
            needs[name] = newest
    return needs


def libc_candidates(machine: int) -> list[str]:
    triplet = _TRIPLETS.get(machine, "")
    return [f"{d}/libc.so.6" for d in (f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64",
                                       "/usr/lib64", "/lib", "/usr/lib") if d]


def glibc_of(info: elf.Info) -> tuple[int, ...] | None:
    """The glibc version a ``libc.so.6`` defines (its newest GLIBC_x.y)."""
    found = [v for n in info.version_defs if (v := elf.glibc_version(n)) is not None]
    return max(found) if found else None


def image_glibc(root_fd: int) -> tuple[int, ...] | None:
    """The glibc version of the image under *root_fd*; None if it has none (musl, static)."""
    from capsid.runtime import inroot

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
    from capsid.runtime import inroot

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
    triplet = _TRIPLETS.get(elf.this_machine()[1], "")
    for standard in (f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64", "/usr/lib64",
                     "/lib", "/usr/lib"):
        if standard not in dirs:
            dirs.append(standard)
    return dirs


def _glob_in(root_fd: int, pattern: str) -> list[str]:
    """The files matching *pattern* (a glob in its last part only) inside the root."""
    import fnmatch

    from capsid.runtime import inroot

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
    return [f"{directory}/{n}" for n in sorted(names) if fnmatch.fnmatch(n, wanted)]


def warn_unloadable(needs: dict[str, tuple[int, ...]], image: tuple[int, ...] | None,
                    option: str, total: int) -> list[str]:
    """Say which of the *total* bound libraries the image's glibc cannot load; their names."""
    if not needs:
        return []
    if image is None:
        LOG.warning("%s: the image has no glibc (musl or static), and the host's driver "
                    "libraries need one: they will not load in it; use an image based on a "
                    "glibc distribution (Debian, Ubuntu, Rocky, ...)", option)
        return sorted(needs)
    bad = {name: v for name, v in needs.items() if v > image}
    if bad:
        listed = ", ".join(f"{n} (needs GLIBC_{elf.dotted(v)})" for n, v in sorted(bad.items()))
        LOG.warning("%s: these host driver libraries need a newer glibc than the image's %s "
                    "and will not load in it: %s; the other %d are bound as usual. Use an "
                    "image with glibc %s or newer, or leave them out of the site's liblist",
                    option, elf.dotted(image), listed, total - len(bad),
                    elf.dotted(max(bad.values())))
    return sorted(bad)


def parse_version(text: str) -> tuple[int, ...] | None:
    found = re.search(r"(\d+(?:\.\d+)+)", text)
    return tuple(int(p) for p in found.group(1).split(".")) if found else None


def cuda_support(cuda: tuple[int, ...], driver: tuple[int, ...]) -> tuple[str, str]:
    """("full" | "minor" | "none" | "unknown", the driver that CUDA release wants)."""
    wanted = next((d for c, d in CUDA_DRIVERS if c <= cuda[:2]), None)
    if wanted is None or cuda[0] > CUDA_DRIVERS[0][0][0]:
        return "unknown", "?"
    if driver >= (parse_version(wanted) or ()):
        return "full", wanted
    floor = CUDA_MINOR_COMPAT.get(cuda[0])
    if floor is not None and driver >= floor:
        return "minor", wanted
    return "none", wanted
