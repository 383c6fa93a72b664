"""Running Python code with layered roots mounted: what COPY, WORKDIR and %setup need.

A child process enters a user namespace (the user as root, nothing else mapped) and a
mount namespace, mounts each root with overlayfs at a private path, and calls the
function with those paths. Writes to the first root land in its upper directory, as a
RUN step's do. Nothing is mounted outside the child, and nothing outlives it.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from capsid.errors import CapsidError
from capsid.runtime import identity, linux, userns
from capsid.runtime.options import Layers


def call_in(roots: Sequence[Layers], scratch: str, fn: Callable[[list[str]], None]) -> None:
    """Call ``fn(paths)`` in a child where ``paths[i]`` is ``roots[i]`` mounted.

    *scratch* is an empty directory of the caller's for the mount points. A root with
    an empty *upper* is mounted read-only. A :class:`CapsidError` raised by *fn* is
    raised here with its message; any other failure becomes one too.
    """
    reader, writer = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child always leaves through os._exit
        os.close(reader)
        code = 0
        try:
            _child(roots, scratch, fn)
        except CapsidError as err:
            os.write(writer, f"E{err.message}\0{err.hint}".encode(errors="replace"))
            code = 1
        except BaseException as err:
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            os.write(writer, f"X{detail}".encode(errors="replace"))
            code = 2
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status == 0:
        return
    if report.startswith("E"):
        message, _, hint = report[1:].partition("\0")
        raise CapsidError(message, hint)
    raise CapsidError(f"a build step failed inside its namespace ({report[1:] or status})",
                      "run again with --debug; this may be a bug in capsid")


def _child(roots: Sequence[Layers], scratch: str, fn: Callable[[list[str]], None]) -> None:
    linux.parent_death_signal(9)  # nothing outlives a killed build
    userns.enter(identity.User.current(), True, subordinate_ids=False)
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    os.chdir(scratch)
    paths = []
    for index, root in enumerate(roots):
        target = os.path.join(scratch, f"root{index}")
        os.mkdir(target)
        names = []
        for number, lower in enumerate(root.lowers):
            name = f"l{index}.{number}"
            os.symlink(lower, name)
            names.append(name)
        if root.upper:
            options = (f"lowerdir={':'.join(names)},upperdir={root.upper},"
                       f"workdir={root.work},userxattr")
        elif len(names) == 1:
            linux.bind(names[0], target, readonly=True)
            paths.append(target)
            continue
        else:
            options = f"lowerdir={':'.join(names)},userxattr"
        try:
            # A root without an upper layer is read-only by itself (MS_RDONLY with
            # userxattr and no upper layer makes overlayfs refuse the mount).
            linux.mount("overlay", target, "overlay", linux.MS_NOSUID | linux.MS_NODEV,
                        options)
        except OSError as err:
            raise CapsidError(f"cannot stack the build's layers with overlayfs: {err.strerror}",
                              "the build cache must be on a local file system; "
                              "set CAPSID_CACHEDIR") from None
        paths.append(target)
    fn(paths)
