"""Mounting squashfs without privileges: a FUSE fd handed to ``squashfuse_ll``.

Inside a fresh user namespace the process may mount a ``fuse`` filesystem
itself, from an fd of ``/dev/fuse``. The server that answers on that fd is
``squashfuse_ll``, started as a double-forked helper *before* the mount
namespace is unshared: it belongs to nobody, holds no reference to the
container's mount namespace, and keeps none of the container's stdio open. When
the container's last process exits the namespace and the mount go away, the fd
reports the disconnect and squashfuse exits by itself — after ``kill -9`` too.
"""

from __future__ import annotations

import _socket
import os
import struct

from capsid import tools
from capsid.errors import RuntimeSetupError
from capsid.runtime import linux


def start_helper(image: str, offset: int) -> _socket.socket:
    """Fork the helper that will serve *image*; return our end of its socket."""
    exe = tools.which("squashfuse_ll")
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            ours.close()
            if os.fork() != 0:
                os._exit(0)
            os.setsid()
            _, ancillary, _, _ = theirs.recvmsg(1, _socket.CMSG_LEN(4))
            if not ancillary:
                os._exit(0)  # the launch gave up before mounting
            (fd,) = struct.unpack("i", ancillary[0][2][:4])
            os.set_inheritable(fd, True)
            null = os.open("/dev/null", os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(null, std)
            argv = [exe, "-f", "-o", f"offset={offset}", image, f"/dev/fd/{fd}"]
            os.execv(exe, argv)
        finally:
            os._exit(127)
    theirs.close()
    os.waitpid(pid, 0)
    return ours


def mount(helper: _socket.socket, target: str, uid: int, gid: int) -> None:
    """Mount a FUSE filesystem on *target* and hand its fd to the helper."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise RuntimeSetupError(
            f"cannot open /dev/fuse: {err.strerror}",
            "ask your administrator to make /dev/fuse mode 0666, or run with --unsquash") from None
    try:
        linux.mount("squashfuse", target, "fuse.squashfuse",
                    linux.MS_NOSUID | linux.MS_NODEV | linux.MS_RDONLY,
                    f"fd={fd},rootmode=40000,user_id={uid},group_id={gid},allow_other,"
                    "default_permissions")
        helper.sendmsg([b"m"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                 struct.pack("i", fd))])
    finally:
        os.close(fd)
        helper.close()
