"""Unpacking a tar stream into a directory with GNU tar, as an ordinary user can.

The stream is written by the caller (a flattener) into tar's stdin. Owners become
the user's (``--no-same-owner``), unless the caller keeps them (a build whose user
namespace maps the image's ids); modes, set-id bits and times are kept. Device nodes
that only root may create are left out; any other failure is an error.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from capsid import tools

Write = Callable[[bytes | memoryview], object]  #: where a tar stream goes


def into(target: Path, fill: Callable[[Write], object], owners: bool = False) -> None:
    """Unpack into existing directory *target* what ``fill(write)`` writes; with
    *owners* the stream's numeric owners are kept."""
    argv = [tools.which("tar"), "-x", "-p",
            *(["--same-owner", "--numeric-owner"] if owners else ["--no-same-owner"]),
            "-C", str(target)]
    errors = open(target.parent / f".{target.name}.tar-errors", "w+b")  # noqa: SIM115
    try:
        proc = tools.start(argv, stdin=subprocess.PIPE, stderr=errors)
        assert proc.stdin is not None
        tools.widen_pipe(proc.stdin.fileno())
        try:
            fill(proc.stdin.write)
            proc.stdin.close()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        status = proc.wait()
        errors.seek(0)
        problems = [line for line in errors.read().decode(errors="replace").splitlines()
                    if "Cannot mknod" not in line and "Exiting with failure" not in line]
    finally:
        errors.close()
        Path(errors.name).unlink(missing_ok=True)
    if status not in (0, 2) or (status == 2 and problems):
        raise tools.failure("tar", status, "\n".join(problems))
