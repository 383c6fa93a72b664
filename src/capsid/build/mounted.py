"""Running Python code with layered roots mounted: what COPY, WORKDIR and %setup need.

A child process enters a user namespace (the user as root, nothing else mapped) and a
mount namespace, mounts each root with overlayfs at a private path, and calls the
function with those paths. Writes to the first root land in its upper directory, as a
RUN step's do. A root's base may be a squashfs, served by squashfuse under its other
layers. Nothing is mounted outside the child, and nothing outlives it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from capsid.errors import CapsidError
from capsid.runtime import child, identity, linux, mounts, userns
from capsid.runtime.options import Layers

#: The exit status of a child that could not serve a base's squashfs (no FUSE mount in
#: this kernel's user namespaces) or whose work failed on the served files (an owner the
#: namespace does not map puts them out of reach): the caller goes on over the base
#: unpacked (:class:`Unserved`).
_UNSERVED = 75


class Unserved(CapsidError):
    """The step could not be done over the served base; the unpacked base will do."""


def can_serve() -> bool:
    """Whether a base's squashfs can be served here (squashfuse, a usable /dev/fuse)."""
    from capsid.runtime import fuse

    try:
        return fuse.server() is not None and os.access("/dev/fuse", os.R_OK | os.W_OK)
    except CapsidError:
        return False


def call_in(roots: Sequence[Layers], scratch: str, fn: Callable[[list[str]], None]) -> None:
    """Call ``fn(paths)`` in a child where ``paths[i]`` is ``roots[i]`` mounted.

    *scratch* is an empty directory of the caller's for the mount points. A root with
    an empty *upper* is mounted read-only. A :class:`CapsidError` raised by *fn* is
    raised here with its message; any other failure becomes one too. Where a root's
    base is to be served, :class:`Unserved` is raised if it cannot be, or if *fn* fails
    on a file (an owner not mapped here, where only the user is, as root, puts base
    files out of reach).
    """
    status = child.start(lambda _report: _child(roots, scratch, fn)).wait()
    if status == _UNSERVED:
        raise Unserved("the base's squashfs could not serve this step",
                       "the base is unpacked for it")
    if status != 0:
        raise CapsidError(f"a build step ended inside its namespace (status {status})",
                          "run again with --debug; this may be a bug in capsid")


def _child(roots: Sequence[Layers], scratch: str, fn: Callable[[list[str]], None]) -> None:
    userns.enter(identity.User.current(), True, subordinate_ids=False)
    serving = any(root.base_image is not None for root in roots)
    try:
        paths = _mount(roots, scratch)
    except (OSError, CapsidError):
        if serving:
            os._exit(_UNSERVED)
        raise
    try:
        fn(paths)
    except OSError:
        # Served, the base's files keep their owners, and those this namespace does not
        # map are out of reach (their directories cannot be written, EACCES; some cannot
        # be copied up, EOVERFLOW), where the unpacked base's are the user's own.
        if serving:
            os._exit(_UNSERVED)
        raise


def _mount(roots: Sequence[Layers], scratch: str) -> list[str]:
    """Each root stacked at a path under *scratch*, its base served where it has one."""
    from capsid.runtime import fuse

    # The servers start before this child's mount namespace exists: a server inside it
    # would keep it, and its own mount, alive (see capsid.runtime.fuse).
    served = [None if root.base_image is None else
              fuse.start_helper(_server(), *root.base_image, 0, 0) for root in roots]
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    os.chdir(scratch)  # the layers' short names are relative to it
    paths = []
    for index, root in enumerate(roots):
        lowers = list(root.lowers)
        helper = served[index]
        if helper is not None:
            base = os.path.join(scratch, f"base{index}")
            os.mkdir(base)
            fuse.mount(helper, base)
            helper.reap()
            lowers.append(base)
        target = os.path.join(scratch, f"root{index}")
        os.mkdir(target)
        mounts.stack(target, lowers, links=f"l{index}", upper=root.upper or None,
                     work=root.work)
        paths.append(target)
    return paths


def _server() -> str:
    from capsid.runtime import fuse

    server = fuse.server()
    assert server is not None, "can_serve() said yes"
    return server
