"""Carrying out the container's mount plan (:mod:`capsid.runtime.ops`), in order.

The one interpreter of the list :func:`capsid.runtime.plan.make` decided: the mounts
land under ``/final`` in the session (:mod:`capsid.runtime.mounts`), then the
environment they call for is read off the assembled root. A rank joining a shared
container reads only the environment (:func:`environment`), its root being in place.
"""

from __future__ import annotations

import os

from capsid import inroot, log
from capsid.runtime import identity, mounts
from capsid.runtime import ops as o

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.gpu.edits import Edits

LOG = log.get(__name__)


class Environment:
    """What the plan adds to the command's environment: *extra* like the launcher's own
    variables, *pinned* over the image's scripts."""

    __slots__ = ("extra", "pinned")

    def __init__(self) -> None:
        self.extra: dict[str, str] = {}
        self.pinned: dict[str, str] = {}


def run(ops: list[o.Op]) -> Environment:
    """Perform every mount of *ops* on /final, then read the environment off it."""
    for op in ops:
        _perform(op)
    return environment(ops, mounts.FINAL, warn=True)


def _perform(op: o.Op) -> None:
    if isinstance(op, o.Bind):
        mounts.bind_into(op.source, op.destination, readonly=op.readonly,
                         nodev=not op.device, required=op.required)
    elif isinstance(op, o.Proc):
        mounts.mount_proc(op.new_pid)
        if op.protect:
            mounts.protect_proc()
    elif isinstance(op, o.MinimalDev):
        mounts.mount_minimal_dev()
    elif isinstance(op, o.File):
        mounts.bind_file(op.content, op.destination.strip("/").replace("/", "_"),
                         op.destination)
    elif isinstance(op, o.Identity):
        passwd = _read_image_file("/etc/passwd")
        if passwd is None:
            LOG.info("the image has no /etc/passwd; adding one")
        mounts.bind_file(identity.passwd(passwd, op.user, op.home), "passwd", "/etc/passwd")
        mounts.bind_file(identity.group(_read_image_file("/etc/group"), op.user), "group",
                         "/etc/group")
    elif isinstance(op, o.OwnDir):
        mounts.own_dir(op.name, op.destination, op.workdir, op.mode)
    elif isinstance(op, o.Target):
        mounts.ensure_target(mounts.FINAL, op.destination, True)
    elif isinstance(op, o.Overlay):
        mounts.overlay_into(op.source, op.scratch, op.destination)
    elif isinstance(op, o.Symlink):
        mounts.symlink_into(op.target, op.link)
    elif isinstance(op, o.CheckMPI):
        from capsid.mpi import host  # imported with the plan, before pivot_root

        root = os.open(mounts.FINAL, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            host.check(op.mpi, root)
        finally:
            os.close(root)


def environment(ops: list[o.Op], root: str, *, warn: bool) -> Environment:
    """The variables *ops* set, for a container whose root is *root*."""
    env = Environment()
    for op in ops:
        if isinstance(op, o.Env):
            (env.pinned if op.pinned else env.extra)[op.name] = op.value
        elif isinstance(op, o.LibraryPath):
            parts = [op.mpi_dir] if op.mpi_dir else []
            if op.gpu is not None:
                parts += _gpu_library_path(op.gpu, root, warn=warn)
            if parts:
                env.extra["LD_LIBRARY_PATH"] = ":".join(parts)
    return env


def _gpu_library_path(gpu: Edits, root: str, *, warn: bool) -> list[str]:
    """The GPU libraries' directories in the container rooted at *root*: the image's own
    first, the driver's after them (Apptainer 1.5's order). With *warn*, say which
    libraries the image's C library cannot load."""
    from capsid import glibc
    from capsid.gpu import compat

    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        version = glibc.image_glibc(fd)
        dirs = glibc.image_library_dirs(fd) if version is not None else []
    finally:
        os.close(fd)
    if warn:
        compat.warn_unloadable(gpu.library_glibc, version, gpu.option, len(gpu.libraries))
    return dirs + [d for d in gpu.library_dirs if d not in dirs]


def _read_image_file(path: str) -> bytes | None:
    root = os.open(mounts.FINAL, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = inroot.open_file(root, path)
    finally:
        os.close(root)
    if fd is None:
        return None
    with open(fd, "rb") as f:
        return f.read(1 << 24)
