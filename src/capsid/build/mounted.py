"""Running Python code with layered roots mounted: what COPY, WORKDIR and %setup need.

A child process enters a user namespace (the user as root, nothing else mapped) and a
mount namespace, mounts each root with overlayfs at a private path, and calls the
function with those paths. Writes to the first root land in its upper directory, as a
RUN step's do. Nothing is mounted outside the child, and nothing outlives it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from capsid.errors import CapsidError
from capsid.runtime import child, identity, linux, mounts, userns
from capsid.runtime.options import Layers


def call_in(roots: Sequence[Layers], scratch: str, fn: Callable[[list[str]], None]) -> None:
    """Call ``fn(paths)`` in a child where ``paths[i]`` is ``roots[i]`` mounted.

    *scratch* is an empty directory of the caller's for the mount points. A root with
    an empty *upper* is mounted read-only. A :class:`CapsidError` raised by *fn* is
    raised here with its message; any other failure becomes one too.
    """
    status = child.start(lambda _report: _child(roots, scratch, fn)).wait()
    if status != 0:
        raise CapsidError(f"a build step ended inside its namespace (status {status})",
                          "run again with --debug; this may be a bug in capsid")


def _child(roots: Sequence[Layers], scratch: str, fn: Callable[[list[str]], None]) -> None:
    userns.enter(identity.User.current(), True, subordinate_ids=False)
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    os.chdir(scratch)  # the layers' short names are relative to it
    paths = []
    for index, root in enumerate(roots):
        target = os.path.join(scratch, f"root{index}")
        os.mkdir(target)
        mounts.stack(target, root.lowers, links=f"l{index}", upper=root.upper or None,
                     work=root.work)
        paths.append(target)
    fn(paths)
