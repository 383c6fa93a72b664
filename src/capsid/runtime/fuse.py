"""Mounting squashfs without privileges: a FUSE mount served by ``squashfuse_ll``.

Inside a fresh user namespace a process may mount a ``fuse`` filesystem itself,
from an fd of ``/dev/fuse`` opened in that namespace; ``squashfuse_ll`` answers on
the fd. Who runs the server, and where, matters:

- It must not live in the container's mount namespace. A server there keeps that
  namespace, and so its own mount, alive: it would never exit.
- It must not stay a child of this process, which becomes the command: a shell's
  bare ``wait`` in the container would wait for it forever.
- It must not be a ``fork`` of this process. Until the child execs, every page
  Python writes here is copied on write: over a thousand page faults.
- It should start as early as possible: its start (exec, libraries, the
  superblock) and its first reads overlap with the rest of the set-up.

With the new mount API (Linux 5.2) the filesystem is created as a *detached*
mount in a throw-away mount namespace, the server is spawned there at once, and
the container's own namespace is unshared from that one; the mount is attached
there later by fd. The throw-away namespace never holds the mount, so when the
container's last process exits the mount goes away, the fd reports the
disconnect and squashfuse exits by itself — after ``kill -9`` too.

On older kernels the fd is mounted with ``mount(2)`` inside the container's
namespace, so the server, spawned before that namespace exists, waits on a pipe
until the fd is mounted.

Either way the server is started with ``posix_spawn`` (no copy of this process):
squashfuse daemonizes itself (a session of its own, reparented to init); on older
kernels a small ``/bin/sh`` waits on the pipe in the background instead.

Which ``squashfuse_ll``: ``$CAPSID_SQUASHFUSE``, else the site's ``squashfuse path``,
else Apptainer's own (multithreaded since Apptainer 1.1, in its libexec directory),
else the one on ``PATH``. Debian 12's 0.1.x serves one request at a time; 0.5 and
later serve on several threads, which ranks sharing a container need.
"""

from __future__ import annotations

import os

from capsid import config, log, tools
from capsid.errors import CapsidError, RuntimeSetupError
from capsid.runtime import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.runtime.imagekeeper import Starting

LOG = log.get(__name__)

#: Run by the spawned shell: $1 is the pipe's fd, the rest is squashfuse's command line.
_WAIT_THEN_SERVE = 'fd=$1; shift; (read -r _ <&"$fd" && exec "$@") & exit 0'
#: Serve blocks from the heap, and keep it, rather than mapping memory per read.
_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=8388608:glibc.malloc.trim_threshold=67108864"


#: where sites that have Apptainer (1.1 or later) keep its multithreaded squashfuse_ll
APPTAINER_SERVERS = ("/usr/libexec/apptainer/bin/squashfuse_ll",
                     "/usr/local/libexec/apptainer/bin/squashfuse_ll",
                     "/opt/apptainer/libexec/apptainer/bin/squashfuse_ll")


def server(site: config.SiteConfig | None = None) -> str | None:
    """The ``squashfuse_ll`` to serve images with, or None if there is none.

    One named by ``$CAPSID_SQUASHFUSE`` or the site's ``squashfuse path`` must be
    there: a wrong name is an error, not a quiet fall-back to a slower server.
    """
    named = os.environ.get("CAPSID_SQUASHFUSE")
    where = "CAPSID_SQUASHFUSE"
    if not named:
        named = (site or config.load()).values.get("squashfuse path")
        where = "the site's 'squashfuse path'"
    if named:
        if not (os.access(named, os.X_OK) and os.path.isfile(named)):
            raise CapsidError(f"{where} names {named}, which is not an executable file",
                              "point it at a squashfuse_ll program, or unset it")
        return named
    for candidate in APPTAINER_SERVERS:
        if os.access(candidate, os.X_OK):
            return candidate
    return tools.find("squashfuse_ll")


def open_device() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise RuntimeSetupError(
            f"cannot open /dev/fuse: {err.strerror}",
            "ask your administrator to make /dev/fuse mode 0666, or run with --unsquash") from None


def _server_env() -> dict[str, str]:
    """The environment for squashfuse: ours, with glibc's allocator told to keep memory.

    squashfuse allocates and frees buffers of a block or more for every read; by
    default glibc maps and unmaps each one, and the page faults that follow cost
    more than the decompression on some machines.
    """
    env = dict(os.environ)
    tunables = [env["GLIBC_TUNABLES"]] if env.get("GLIBC_TUNABLES") else []
    env["GLIBC_TUNABLES"] = ":".join([*tunables, _MALLOC_TUNABLES])
    return env


def _spawn(argv: list[str], fds: tuple[int, ...], *, setsid: bool = False) -> int:
    """Start *argv* with *fds* inherited, stdio on /dev/null, and the server's environment."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        null = [(os.POSIX_SPAWN_OPEN, std, "/dev/null", os.O_RDWR, 0) for std in (0, 1, 2)]
        return os.posix_spawn(argv[0], argv, _server_env(), file_actions=null, setsid=setsid)
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def _reap(pid: int) -> None:
    try:  # noqa: SIM105 - contextlib costs milliseconds to import
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # with --pid this process is a fork: the child is its parent's


class _Server:
    """The process spawned to start the image's server: collected once, and the
    server found by the end of its command line."""

    def __init__(self, launcher: int | None, tail: list[str]) -> None:
        self.launcher, self.tail = launcher, tail
        #: the mount namespace the server was spawned in (this process's, now)
        self.namespace = os.stat("/proc/self/ns/mnt").st_ino if launcher is not None else 0
        self.reaped = self.released = False
        self.server: int | None = None  #: its PID, once found

    def reap(self) -> None:
        """Collect the launcher (it exits once the server runs on its own); once, so
        that a later process given its PID is never waited for."""
        if not self.reaped and self.launcher is not None:
            self.reaped = True
            _reap(self.launcher)

    def set_cpus(self, cpus: set[int], proc: int, *, last: bool = False) -> None:
        """Run the server (every thread of it) on *cpus*. The start pins it beside this
        process while the mounts are made; the *last* call gives it back the whole set,
        and no call after that changes it: it serves the command's reads from any CPU.

        It is the launcher's child, with a PID a little above the launcher's. *proc* is
        the host's ``/proc``, opened before a container's root or PID namespace hid it.
        """
        if self.released or self.launcher is None:
            return
        self.released = last
        if self.server is None:
            self.server = self.find(proc)
        if self.server is None:
            LOG.debug("image server not found; it keeps the CPUs it has")
            return
        try:
            fd = os.open(f"{self.server}/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=proc)
            try:
                tasks = os.listdir(fd)
            finally:
                os.close(fd)
        except OSError:  # it ended
            return
        for tid in tasks:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:  # a thread that just ended
                continue

    def find(self, proc: int) -> int | None:
        """The server's PID, found in *proc* (a ``/proc`` fd); None if it is not running.

        Servers of other starts of the same image have the same command line, never the
        same mount namespace (a start's server keeps its own alive, so the id is its).
        """
        if self.launcher is None:
            return None
        tail = "\0".join(self.tail).encode() + b"\0"
        for pid in range(self.launcher + 1, self.launcher + 64):
            try:
                fd = os.open(f"{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
                with open(fd, "rb") as f:
                    if f.read().endswith(tail) \
                            and os.stat(f"{pid}/ns/mnt", dir_fd=proc).st_ino == self.namespace:
                        return pid
            except OSError:
                continue
        return None


class Served(_Server):
    """A FUSE mount whose server is running, detached until :meth:`attach`: one this
    start spawned (*launcher* is its launcher's PID), or a copy of a kept one (None)."""

    def __init__(self, mount_fd: int, launcher: int | None, tail: list[str]) -> None:
        super().__init__(launcher, tail)
        self.mount_fd = mount_fd
        #: a new image keeper, which gets a copy once the mount is attached
        self.keeper: Starting | None = None

    def attach(self, target: str) -> None:
        linux.attach(self.mount_fd, target)
        os.close(self.mount_fd)
        if self.keeper is not None:
            self.keeper.hand_over(target)
            self.keeper = None


def serve_detached(exe: str, image: str, offset: int, uid: int, gid: int) -> Served | None:
    """Create the image's FUSE mount detached and start its server *exe* now.

    Call in the user namespace, before unsharing the container's mount namespace:
    this process moves to a throw-away mount namespace, where the server stays.
    None when the kernel lacks the new mount API; use :func:`start_helper` then.
    """
    linux.unshare(linux.CLONE_NEWNS)
    fuse_fd = open_device()
    try:
        try:
            mount_fd = linux.fs_mount("fuse", {
                "source": "squashfuse", "subtype": "squashfuse", "fd": str(fuse_fd),
                "rootmode": "40000", "user_id": str(uid), "group_id": str(gid),
                "allow_other": None, "default_permissions": None,
            }, linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV)
        except OSError as err:
            LOG.debug("no detached FUSE mount (%s); mounting it in the container", err.strerror)
            return None
        # Without -f, squashfuse daemonizes itself: it forks, starts a session,
        # and the process spawned here exits once the server runs.
        tail = ["-o", f"offset={offset}", image, f"/dev/fd/{fuse_fd}"]
        launcher = _spawn([exe, *tail], (fuse_fd,))
        return Served(mount_fd, launcher, tail)
    finally:
        os.close(fuse_fd)


class Helper(_Server):
    """A server waiting to be let go, and what this process still holds for it. Its
    launcher is a shell that exits at once, leaving the waiting one behind."""

    def __init__(self, fuse_fd: int, go: int, shell: int, owner: tuple[int, int],
                 tail: list[str]) -> None:
        super().__init__(shell, tail)
        self.fuse_fd, self.go, self.owner = fuse_fd, go, owner

    def release(self) -> None:
        """Let the server start (if the fd was mounted); it no longer needs this process."""
        os.close(self.go)
        os.close(self.fuse_fd)


def start_helper(exe: str, image: str, offset: int, uid: int, gid: int) -> Helper:
    """Open ``/dev/fuse`` and spawn the server *exe* that will answer on it, waiting.

    The filesystem will belong to *uid* and *gid* (as seen in the user namespace).
    """
    fuse_fd = open_device()
    wait_fd, go = os.pipe()
    try:
        shell = _spawn(["/bin/sh", "-c", _WAIT_THEN_SERVE, "capsid-fuse", str(wait_fd),
                        exe, "-f", "-o", f"offset={offset}", image, f"/dev/fd/{fuse_fd}"],
                       (fuse_fd, wait_fd), setsid=True)
    except BaseException:
        os.close(fuse_fd)
        os.close(go)
        raise
    finally:
        os.close(wait_fd)
    return Helper(fuse_fd, go, shell, (uid, gid),
                  ["-f", "-o", f"offset={offset}", image, f"/dev/fd/{fuse_fd}"])


def mount(helper: Helper, target: str) -> None:
    """Mount the helper's FUSE fd on *target*, then let the helper serve it."""
    uid, gid = helper.owner
    try:
        linux.mount("squashfuse", target, "fuse.squashfuse",
                    linux.MS_NOSUID | linux.MS_NODEV | linux.MS_RDONLY,
                    f"fd={helper.fuse_fd},rootmode=40000,user_id={uid},group_id={gid},"
                    "allow_other,default_permissions")
        os.write(helper.go, b"\n")
    finally:
        helper.release()

