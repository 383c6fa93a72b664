"""The namespaces a container may add: UTS (its host name) and network (loopback only)."""

from __future__ import annotations

from capsid import log
from capsid.runtime import linux

LOG = log.get(__name__)


def flags(*, pid: bool, ipc: bool, uts: bool, net: bool) -> int:
    """The ``unshare(2)`` flags for a container's mount namespace and the ones asked for."""
    return (linux.CLONE_NEWNS | (linux.CLONE_NEWPID if pid else 0)
            | (linux.CLONE_NEWIPC if ipc else 0) | (linux.CLONE_NEWUTS if uts else 0)
            | (linux.CLONE_NEWNET if net else 0))


def set_hostname(name: str) -> None:
    import _socket

    _socket.sethostname(name)


def loopback_up() -> None:
    import _socket
    import fcntl
    import struct

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sH14s", b"lo", 0x1 | 0x40, b"")  # IFF_UP | IFF_RUNNING
        fcntl.ioctl(sock.fileno(), 0x8914, request)  # SIOCSIFFLAGS
    except OSError as err:
        LOG.debug("could not bring up lo: %s", err.strerror)
    finally:
        sock.close()
