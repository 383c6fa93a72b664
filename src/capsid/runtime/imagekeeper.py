"""An image kept served for the user's next container (``image server linger``).

Without a keeper, each container spawns an image server of its own, and every lookup and
page behind its mounts and its command's first steps is read and decompressed anew. With
one, a start leaves a small process behind, the *keeper*: it holds the user namespace the
container was made in and a copy of the image's mount. For ``image server linger`` seconds
after it last helped a start (10 by default, 0 turns keepers off), a start of the same
image joins that user namespace and gets its own copy of the mount (``open_tree``): no
server to spawn, and what earlier containers looked up and read is in the kernel's caches.

Each container still has a mount namespace of its own, made from its caller's at its
start: its binds, overlays, tmpfs, /etc files and working directory are its own. What
the containers of one keeper share is the user namespace (the same ids, mapped the same
way) and the image's server. So a keeper is joined only by a start that would have made
the same ones: same user and group, same image file (device, inode, size, modification
time, offset), same server program, same id mapping (``--fakeroot``, subordinate ids),
and the same user namespace and cgroup of the caller (a Slurm step's end kills its
cgroup, the server with it). A keeper is found by a Unix socket in the user's private
runtime directory, named by a hash of that key; the joiner sends the whole key, and the
keeper compares it before it answers with two fds: its user namespace and a copy of the
mount.

The server keeps to :mod:`capsid.runtime.fuse`'s rules: it lives in a mount namespace
of its own, which never holds the mount. The keeper holds a copy in another one, each
container its own. When the keeper has exited and the last container has ended, the
mount goes and the server exits by itself.
"""

from __future__ import annotations

import _socket as socket  # the C module: ``socket`` costs 5 ms to import
import os
import sys

from capsid import config, log
from capsid.errors import CapsidError
from capsid.runtime import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from capsid.image.locate import Image
    from capsid.runtime.fuse import Served

LOG = log.get(__name__)

DEFAULT_LINGER = 10.0  #: seconds
_HELLO = b"capsid image keeper 1\0"
_FDS = 2  #: what a keeper hands over: its user namespace, a copy of the mount
_FIRST_HANDOVER_PATIENCE = 300.0  #: seconds a new keeper waits for its container's mount


def linger(site: config.SiteConfig) -> float:
    """Seconds a keeper waits for the next start: ``CAPSID_IMAGE_LINGER``, else the
    site's ``image server linger``, else 10; 0 means no keeper."""
    default = DEFAULT_LINGER
    text = site.values.get("image server linger")
    if text is not None:
        try:
            default = float(text)
        except ValueError:
            default = -1.0
        if not 0 <= default < 3600:
            raise CapsidError(f"the site's 'image server linger = {text}' is not a number "
                              "of seconds", "set it to e.g. 10, or to 0 for no keeper")
    return config.env_seconds("IMAGE_LINGER", default)


class Keeping:
    """The keeper of one image for this start: its key and where it answers."""

    __slots__ = ("address", "folder", "key", "linger", "name")

    def __init__(self, key: bytes, folder: str, linger: float) -> None:
        from capsid.tools import sha256_hex

        self.key, self.folder, self.linger = key, folder, linger
        self.name = sha256_hex(key)[:32] + ".sock"
        self.address = os.path.join(folder, self.name)

    def join(self) -> tuple[int, int] | None:
        """The keeper's user namespace and a copy of its mount, or None where no keeper
        of this key answers."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        folder = -1
        try:
            sock.settimeout(2.0)
            folder = os.open(self.folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            sock.connect(_short(folder, self.name))
            if _peer_uid(sock) != os.getuid():
                return None  # not ours: never trusted, whatever the directory says
            sock.send(_HELLO + self.key)
            answer, fds = _receive(sock)
        except OSError as err:
            if not isinstance(err, (FileNotFoundError, ConnectionRefusedError)):
                LOG.debug("image keeper %s: %s", self.address, err)
            return None
        finally:
            sock.close()
            if folder >= 0:
                os.close(folder)
        if answer != b"ok" or len(fds) != _FDS:
            for fd in fds:
                os.close(fd)
            return None
        return fds[0], fds[1]

    def start(self, served: Served) -> Starting | None:
        """Fork a keeper (detached: nobody's child) that waits for the container's mount
        from *served*'s server (:meth:`Starting.hand_over`); None if it cannot be."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError as err:  # a process limit: this start serves only itself
            LOG.debug("no image keeper: %s", err)
            ours.close()
            theirs.close()
            return None
        if pid == 0:  # pragma: no cover - the intermediate child and the keeper
            try:
                ours.close()
                os.setsid()
                if os.fork() == 0:
                    _keep(self, theirs, served)
            finally:
                os._exit(0)
        theirs.close()
        return Starting(ours, pid)


class Starting:
    """A keeper forked by this start, waiting for a copy of the image's mount; and the
    child it was forked by, which exits at once and is collected at the hand-over."""

    __slots__ = ("channel", "intermediate")

    def __init__(self, channel: socket.socket, intermediate: int) -> None:
        self.channel, self.intermediate = channel, intermediate

    def hand_over(self, target: str) -> None:
        """Give the keeper a copy of the image's mount at *target* (in this process's
        mount namespace); a keeper that cannot have it just exits."""
        try:
            clone = linux.clone_mount(target)
            try:
                self.channel.sendmsg([b"mount"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   clone.to_bytes(4, sys.byteorder,
                                                                  signed=True))])
            finally:
                os.close(clone)
        except OSError as err:
            LOG.debug("no image keeper: %s", err)
        finally:
            self.channel.close()
            try:  # noqa: SIM105 - contextlib costs milliseconds to import
                os.waitpid(self.intermediate, 0)
            except ChildProcessError:
                pass  # with --pid this process is a fork: the child is its parent's


def find(image: Image, server: str, *, fakeroot: bool, subordinate_ids: bool,
         site: config.SiteConfig) -> Keeping | None:
    """This start's keeper (to join, or to start), or None where keepers are off or no
    private place for their sockets exists."""
    seconds = linger(site)
    if seconds <= 0:
        return None
    from capsid import hostfs

    try:
        folder = hostfs.runtime_dir("images", f"/tmp/capsid-{os.getuid()}")
        key = _key(image, server, fakeroot=fakeroot, subordinate_ids=subordinate_ids)
    except (OSError, hostfs.Refused) as err:
        LOG.debug("no image keeper: %s", getattr(err, "message", None) or err)
        return None
    return Keeping(key, folder, seconds)


def _short(folder: int, name: str) -> str:
    """*name* in the directory open at *folder*, by a path that fits a socket address
    (108 bytes, which a long ``XDG_RUNTIME_DIR`` or ``/tmp`` path would not)."""
    return f"/proc/self/fd/{folder}/{name}"


def _key(image: Image, server: str, *, fakeroot: bool, subordinate_ids: bool) -> bytes:
    """Everything a shared user namespace and image server must agree on (see above)."""
    path = os.path.realpath(image.path)
    info = os.stat(path)
    with open("/proc/self/cgroup", "rb", buffering=0) as f:
        cgroup = f.read()
    parts = (str(os.getuid()), str(os.getgid()), path,
             f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}",
             str(image.offset), os.path.realpath(server), f"{fakeroot}:{subordinate_ids}",
             os.readlink("/proc/self/ns/user"))
    return "\0".join(parts).encode(errors="surrogateescape") + b"\0" + cgroup


def _peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of *sock* (``struct ucred``'s uid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds it carries (close-on-exec)."""
    data, ancillary, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(4 * _FDS),
                                         socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                    for i in range(0, len(payload) - len(payload) % 4, 4)]
    return data, fds


def _keep(keeping: Keeping, channel: socket.socket,
          served: Served) -> NoReturn:  # pragma: no cover
    """The keeper: get the mount, keep a copy in a mount namespace of its own, answer
    starts of the same key until none came for ``linger`` seconds, or the server ends."""
    import fcntl
    import select

    code = 1
    folder_fd = -1
    bound: int | None = None
    name = keeping.name
    try:
        os.closerange(3, channel.fileno())
        os.closerange(channel.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        os.chdir("/")  # the caller's working directory is not kept busy
        linux.set_name("capsid-keeper")
        channel.settimeout(_FIRST_HANDOVER_PATIENCE)
        _, fds = _receive(channel)  # nothing: the container failed before its mount
        channel.close()
        if len(fds) != 1:
            os._exit(0)
        mount = fds[0]
        server = _watch(served)
        userns = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        folder_fd = os.open(keeping.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fcntl.flock(folder_fd, fcntl.LOCK_EX)
        if keeping.join() is not None:
            os._exit(0)  # another keeper of this key answers already
        try:  # noqa: SIM105
            os.unlink(name, dir_fd=folder_fd)  # a keeper that is gone
        except FileNotFoundError:
            pass
        listener.bind(_short(folder_fd, name))
        bound = os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_ino
        listener.listen(64)
        fcntl.flock(folder_fd, fcntl.LOCK_UN)
        # The copy lives in a mount namespace of the keeper's own, over its (bound)
        # folder: nothing else sees it, and it goes when the keeper does.
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.attach(mount, keeping.folder)
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        if server >= 0:
            poller.register(server, select.POLLIN)
        while True:
            events = poller.poll(int(keeping.linger * 1000))
            if any(fd == server for fd, _ in events):
                break  # the server ended (killed): the mount is dead
            if not events:
                fcntl.flock(folder_fd, fcntl.LOCK_EX)  # a start that looks now finds none
                listener.setblocking(False)
                try:
                    conn, _ = listener._accept()  # type: ignore[attr-defined]
                except BlockingIOError:
                    break
                listener.setblocking(True)
                fcntl.flock(folder_fd, fcntl.LOCK_UN)
            else:
                conn, _ = listener._accept()  # type: ignore[attr-defined]
            if not _answer(conn, keeping.key, userns, mount, check=server < 0):
                break  # the server is gone: no later start may join
        code = 0
    except BaseException:  # nobody hears a keeper: it just ends
        code = 1
    finally:
        if bound is not None:
            try:
                if os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_ino == bound:
                    os.unlink(name, dir_fd=folder_fd)
            except OSError:
                pass
        os._exit(code)


def _watch(served: Served) -> int:  # pragma: no cover - runs in the keeper
    """A pidfd of the image's server, readable once it ends; -1 where it is not found."""
    try:
        proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pid = served.find(proc)
        finally:
            os.close(proc)
        return -1 if pid is None else os.pidfd_open(pid)
    except OSError:
        return -1


def _answer(fd: int, key: bytes, userns: int, mount: int, *,
            check: bool) -> bool:  # pragma: no cover - runs in the keeper
    """Hand a start its fds if it asks with our key; False if the server is gone (asked
    only with *check*: where the keeper does not watch the server)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
    try:
        conn.settimeout(1.0)
        if _peer_uid(conn) != os.getuid() \
                or conn.recv(len(_HELLO) + len(key) + 1) != _HELLO + key:
            conn.send(b"no")
            return True
        if check:
            try:  # the server still answers (a cached stat would not ask it)
                os.close(os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                 dir_fd=mount))
            except OSError:
                conn.send(b"gone")
                return False
        clone = linux.clone_mount("", mount)
        try:
            conn.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    userns.to_bytes(4, sys.byteorder, signed=True)
                                    + clone.to_bytes(4, sys.byteorder, signed=True))])
        finally:
            os.close(clone)
    except OSError:
        pass
    finally:
        conn.close()
    return True
