#!/usr/bin/python3
"""Forward TCP between network namespaces, for the simulated Slurm cluster of the tests.

    nsforward.py FROM_NS:ADDR:PORT=TO_NS:ADDR:PORT ...

Listens in namespace FROM_NS (a name under /run/netns, or "host") and connects, for
each client, to ADDR:PORT in TO_NS. Runs as root (setns). A socket belongs to the
namespace it was created in, so one process can bridge them: each socket is made by
a thread switched to its namespace (setns switches the calling thread only), which
switches back at once.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ns_fd(name: str) -> int:
    path = "/proc/self/ns/net" if name == "host" else f"/run/netns/{name}"
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


HOST = _ns_fd("host")


def _in_namespace(fd: int, make: object) -> socket.socket:
    """Call *make* with this thread switched to the namespace *fd*, then switch back."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    try:
        return make()  # type: ignore[operator, no-any-return]
    finally:
        _libc.setns(HOST, CLONE_NEWNET)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for each in (source, sink):
            try:
                each.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(listener: socket.socket, target_ns: int, address: tuple[str, int]) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = _in_namespace(target_ns, lambda: socket.socket())
            upstream.connect(address)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def main() -> int:
    threads = []
    for spec in sys.argv[1:]:
        left, right = spec.split("=")
        from_ns, from_addr, from_port = left.split(":")
        to_ns, to_addr, to_port = right.split(":")

        def listen(addr: str = from_addr, port: int = int(from_port)) -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: an address on a local route
            sock.bind((addr, port))
            sock.listen(128)
            return sock

        listener = _in_namespace(_ns_fd(from_ns), listen)
        thread = threading.Thread(target=_serve, daemon=True,
                                  args=(listener, _ns_fd(to_ns), (to_addr, int(to_port))))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
