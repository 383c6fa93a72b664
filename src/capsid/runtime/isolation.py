"""What the namespaces a container may add need: UTS (its host name) and network
(loopback only). Imported only when they are asked for."""

from __future__ import annotations

from capsid import log

LOG = log.get(__name__)


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
