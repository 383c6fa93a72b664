"""What a container start does first: the user namespace, and the image's FUSE server.

The rest of capsid's start (importing the runtime, checking options, planning the
mounts) is a few milliseconds of pure Python. Doing these two things before it lets
squashfuse start, and read ahead the programs the container will run, on another
CPU meanwhile. So this module imports little, and the CLI calls it before it
imports :mod:`capsid.runtime.container`.
"""

from __future__ import annotations

import os

import capsid
from capsid import log
from capsid.image.locate import LAYERS, SANDBOX, SIF, Image, locate
from capsid.runtime import identity, linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from capsid.runtime import imagekeeper
    from capsid.runtime.fuse import Helper, Served
    from capsid.runtime.options import Layers

    T = TypeVar("T")

LOG = log.get(__name__)


class Started:
    """What :func:`start` did, for the launch to go on from."""

    def __init__(self, image: Image, user: identity.User, userns: bool,
                 fuse_mount: Helper | Served | None, first_programs: list[str],
                 affinity: tuple[set[int], int] | None, layers: Layers | None = None,
                 unpacked: str | None = None) -> None:
        self.image, self.user, self.userns, self.fuse_mount = image, user, userns, fuse_mount
        self.first_programs = first_programs
        #: this process's CPUs before the start pinned it, to give back to the command
        #: and the image server, and the host's /proc to find the server in
        self.affinity = affinity
        self.layers = layers  #: the layered root, when the image is one
        #: the image unpacked for the job on this node (--unsquash)
        self.unpacked = unpacked


def programs(action: str, argv: tuple[str, ...], shell: str | None) -> list[str]:
    """What the container will start: the command, then the shell of the env prelude.

    Images whose environment scripts are all capsid's own start the command
    directly; others source them with the image's /bin/sh first.
    """
    first = []
    if action == "exec" and argv:
        first.append(argv[0])
    elif action == "shell":
        first.append(shell or "/bin/bash")
    return [*first, "/bin/sh"]


def start(image: str | Layers, *, fakeroot: bool, unsquash: bool,
          first_programs: list[str], subordinate_ids: bool = True) -> Started:
    """Find the image, enter the user namespace, and start serving the image if FUSE will.

    The server is spawned before anything that can wait: the user's passwd entry
    (``--fakeroot`` needs it first, for its subordinate ids) is looked up after.
    A layered root (the builder's) needs no server; its steps run as root inside, mapped
    to the user alone unless *subordinate_ids*.
    """
    from capsid.runtime import userns  # here: a rank joining a shared container has no use

    if not isinstance(image, str):
        if image.base_image is not None:
            raise ValueError("a container's layers must be directories (see Layers.base_image)")
        userns.enter(identity.User.current(), True, subordinate_ids=subordinate_ids)
        return Started(Image(image.name, LAYERS), identity.User.current(), True, None,
                       first_programs, None, image)
    located = locate(image)
    if located.kind == SIF:
        _control(located.path)
    unpacked = None
    if unsquash and located.kind != SANDBOX:  # as the user, before the user namespace
        from capsid import config
        from capsid.runtime import unsquashed

        with open(located.path, "rb") as f:
            unpacked = unsquashed.shared_tree(f.fileno(), located.offset, config.load())
    in_userns = fakeroot or os.geteuid() != 0 or userns.mapped_ids() < 0xFFFFFFFF
    user = identity.User.current() if fakeroot else None
    capsid.mark("runtime imported")
    server = _server() if in_userns and located.kind != SANDBOX and not unsquash else None
    keeping = _keeping(located, server, fakeroot, subordinate_ids) if server else None
    # a kept image: its keeper's user namespace joined, and a copy of its mount
    fuse_mount: Helper | Served | None = _join(keeping) if keeping else None
    if fuse_mount is None and in_userns:
        userns.enter(user or identity.User.ids(), fakeroot, subordinate_ids=subordinate_ids)
    capsid.mark("user namespace")
    if server is not None:
        if fuse_mount is None:
            owner = (0, 0) if fakeroot else (os.getuid(), os.getgid())
            fuse_mount = _serve(server, located, owner, first_programs, keeping)
        capsid.mark("image server started")
    return Started(located, user or identity.User.current(), in_userns, fuse_mount,
                   first_programs, None, unpacked=unpacked)


def _control(path: str) -> None:
    """The site's execution control list, if it has one, before anything is mounted."""
    from capsid import config

    site = config.load()
    if os.path.exists(site.values.get("ecl file") or "/etc/capsid/ecl.toml"):
        from capsid.signing import ecl

        ecl.enforce(path, site)


def share_one_cpu(started: Started) -> None:
    """Run this process and the image server on the current CPU only, until the command
    starts (:func:`release_cpus`); the old CPU set is kept in *started*.

    Setting up the container is a conversation with squashfuse, one request and
    answer after another. On separate CPUs every turn wakes the other one, which
    costs a virtual machine tens of microseconds per request; on one CPU each side
    simply runs while the other waits. Until now (the imports, the plan) both ran
    apart: the server starts and reads the programs ahead beside the Python work.
    Under Slurm or MPI binding the set often is one CPU already.
    """
    served = started.fuse_mount
    if served is None or served.launcher is None:  # none, or a kept one (no set-up talk)
        return
    allowed = os.sched_getaffinity(0)
    cpu = linux.current_cpu()
    if len(allowed) < 2 or cpu not in allowed:
        return
    # the host's /proc, to find the server by when the container's root hides it
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.sched_setaffinity(0, {cpu})
    served.set_cpus({cpu}, proc)
    started.affinity = allowed, proc


def on_all_cpus(started: Started, fn: Callable[[], T]) -> T:
    """``fn()`` on every CPU this process had before :func:`share_one_cpu`: what it starts
    now (an overlay image's servers) keeps that set, and must not stay on the one CPU
    shared with the image server for as long as the container runs."""
    if started.affinity is None:
        return fn()
    one = os.sched_getaffinity(0)
    os.sched_setaffinity(0, started.affinity[0])
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, one)


def release_server(started: Started) -> None:
    """Collect the image server's launcher and give the server back the CPUs that
    :func:`share_one_cpu` took. Before a PID namespace of the container's: the
    server would not be seen from there."""
    served = started.fuse_mount
    if served is not None:
        served.reap()
        if started.affinity is not None:
            served.set_cpus(*started.affinity, last=True)


def release_cpus(started: Started) -> None:
    """The start is done: the image server, then this process (about to become the
    command), get back their CPUs."""
    release_server(started)
    if started.affinity is not None:
        os.sched_setaffinity(0, started.affinity[0])
        os.close(started.affinity[1])
        started.affinity = None


def _server() -> str | None:
    """The squashfuse_ll to serve the image with, where FUSE is usable; else None."""
    from capsid.runtime import fuse

    server = fuse.server()
    if server is None:
        LOG.warning("squashfuse_ll is not installed: unpacking the image into memory instead "
                    "(apt-get install squashfuse for faster starts)")
        return None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        LOG.warning("/dev/fuse is not usable by you: unpacking the image into memory instead "
                    "(ask an administrator to make /dev/fuse mode 0666)")
        return None
    return server


def _keeping(image: Image, server: str, fakeroot: bool,
             subordinate_ids: bool) -> imagekeeper.Keeping | None:
    """Where this start's image keeper answers (None: keepers are off)."""
    from capsid import config
    from capsid.runtime import imagekeeper

    return imagekeeper.find(image, server, fakeroot=fakeroot,
                            subordinate_ids=subordinate_ids, site=config.load())


def _join(keeping: imagekeeper.Keeping) -> Served | None:
    """The user namespace and a copy of the mount of a keeper of this image, joined;
    None where none answers (or its namespace cannot be joined)."""
    from capsid.runtime import fuse

    joined = keeping.join()
    if joined is None:
        return None
    namespace, mount = joined
    try:
        linux.setns(namespace, linux.CLONE_NEWUSER)
    except OSError as err:
        LOG.debug("cannot join the image keeper's user namespace: %s", err)
        os.close(mount)
        return None
    finally:
        os.close(namespace)
    return fuse.Served(mount, None, [])


def _serve(server: str, image: Image, owner: tuple[int, int], first_programs: list[str],
           keeping: imagekeeper.Keeping | None = None) -> Helper | Served:
    """A running server and its detached mount, or else a helper waiting for the mount;
    with *keeping*, a keeper started to keep the mount for later starts."""
    from capsid.runtime import fuse, prefetch

    path = os.path.realpath(image.path)
    served = fuse.serve_detached(server, path, image.offset, *owner)
    if served is None:
        return fuse.start_helper(server, path, image.offset, *owner)
    if keeping is not None:
        served.keeper = keeping.start(served)

    prefetch.start(os.dup(served.mount_fd), first_programs)
    return served
