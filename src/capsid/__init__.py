"""capsid: containers for HPC.

Build, convert and run Apptainer-compatible SIF images as an ordinary user.
The package is organised by stage of the data path: ``image`` (SIF, squashfs,
sandboxes), ``runtime`` (namespaces and mounts; :mod:`capsid.runtime.api` is its
library entry), ``gpu`` (what device support adds to a container), ``oci``
(registries and layers), ``build`` (recipes) on top, and ``cli`` as the thin front end.
"""

__version__ = "0.1.0"

import os as _os

#: CAPSID_TIMING=FILE: the start's phases, as (name, CLOCK_MONOTONIC ns), for
#: bench/exec_startup.py's breakdown; None (and free) otherwise
_MARKS: list[tuple[str, int]] | None = [] if _os.environ.get("CAPSID_TIMING") else None
_OUT: list[int] = []  #: the file's fd, opened at the first mark


def mark(name: str) -> None:
    """Note that the start reached *name* (only with ``CAPSID_TIMING``)."""
    if _MARKS is not None:
        import time

        _MARKS.append((name, time.monotonic_ns()))
        if not _OUT:  # opened now: the container's root will hide the host's file
            _OUT.append(_os.open(_os.environ["CAPSID_TIMING"], _os.O_WRONLY | _os.O_CREAT
                                 | _os.O_TRUNC | _os.O_CLOEXEC, 0o600))


def write_marks() -> None:
    """Write the marks, a ``name ns`` line each, before the command replaces capsid."""
    if _MARKS and _OUT:
        _os.write(_OUT[0], "".join(f"{n} {v}\n" for n, v in _MARKS).encode())
