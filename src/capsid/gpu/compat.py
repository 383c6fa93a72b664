"""Will the host's driver load in this image? Apptainer's most reported GPU failure,
caught before the command starts.

Host libraries built against a newer glibc than the image's fail at run time with
``version `GLIBC_2.34' not found (required by /.singularity.d/libs/libGLdispatch.so.0)``.
Each library's ELF version needs say which glibc it wants; the image's ``libc.so.6``
says which glibc it is. The same facts, plus the driver's and the image's CUDA
versions, feed ``capsid doctor``.
"""

from __future__ import annotations

import re

from capsid import elf, glibc, log  # noqa: F401 - glibc: used after pivot_root, by container

LOG = log.get(__name__)

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
