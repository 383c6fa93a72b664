"""``--pid``: the process that stays outside the new PID namespace, and the namespace's init.

The first process of a new PID namespace must be a child, so with ``--pid`` capsid
forks: the parent supervises (forwards signals, exits as the command did), the child
becomes PID 1 and forks the command as PID 2. The kernel drops signals sent to a
namespace's PID 1 that it has no handler for, so the command must not be PID 1, or
Slurm's SIGTERM would never reach it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


#: fds a caller waits on until the command starts (closed on exec): the supervisor and
#: PID 1, which never exec, close them themselves
REPORT_FDS: list[int] = []


def _close_reports() -> None:
    for fd in REPORT_FDS:
        try:  # noqa: SIM105 - contextlib may not import any more
            os.close(fd)
        except OSError:
            pass


def exit_like(status: int) -> NoReturn:
    """Exit the way a process with wait *status* did: the same code, or the same signal."""
    if os.WIFSIGNALED(status):
        import _signal  # type: ignore[import-not-found]

        signum = os.WTERMSIG(status)
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _forward_signals(pid: int) -> None:
    # _signal, not signal: it is built into the interpreter, so it imports even
    # after the container's root has hidden the host's standard library.
    import _signal

    for forwarded in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT,
                      _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGCONT, _signal.SIGALRM):
        _signal.signal(forwarded, lambda s, _f: os.kill(pid, s))


def supervise(child: int, status_pipe: int) -> NoReturn:
    """--pid, outside: forward signals to the namespace's init, exit as the command did."""
    _close_reports()
    _forward_signals(child)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(255)
        except InterruptedError:
            continue
    reported = os.read(status_pipe, 16)
    exit_like(int(reported) if reported else status)


def init(command: int, status_pipe: int) -> NoReturn:
    """--pid, inside: PID 1 reaps orphans and hands signals to the command (PID 2).

    The kernel drops signals sent to a namespace's PID 1 that it has no handler for,
    so the command must not be PID 1 or Slurm's SIGTERM would never reach it.
    """
    _close_reports()
    _forward_signals(command)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(255)
        except InterruptedError:
            continue
        if pid == command:
            os.write(status_pipe, str(status).encode())
            _stop_the_rest()
            os._exit(0)


def _stop_the_rest(seconds: float = 5.0) -> None:
    """SIGTERM what is left in the namespace (an overlay image's fuse2fs writes back
    then), and reap it for up to *seconds*; leaving PID 1 then kills the rest."""
    import _signal
    import time

    try:
        os.kill(-1, _signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
