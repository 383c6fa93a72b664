"""Work in a forked child that reports its set-up over a pipe: the one child runner.

What capsid does inside namespaces runs in a child: a container for the builder's
steps and ``api.run`` (tied to the caller: it dies with it), an instance (detached, in
a session of its own), a node's shared-container keeper, Python code with a build's
layers mounted. The child calls *work* with the pipe's write end; an error it raises
travels back and is raised in the parent as a :class:`~capsid.errors.CapsidError`.
The pipe closes by itself when the child's command starts (close-on-exec) or when it
exits, so the parent learns of success without a message. A child that goes on
running (a keeper) may say it is ready with :func:`ready`, passing its warnings on.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class Child:
    """A started child, and what its set-up said (warnings, already shown)."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self) -> int:
        """Its exit status, as a shell gives it (128 + N for a death by signal N)."""
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.waitstatus_to_exitcode(status)


def start(work: Callable[[int], object], *, tied: bool = True, detach: bool = False,
          stdio: tuple[int, int, int] | None = None, keep_fds: bool = True) -> Child:
    """Fork a child running ``work(report_fd)``, and return once its set-up is done.

    *tied*: the child is killed when the caller dies (kill -9 of a build leaves
    nothing). *detach*: a session of its own. *stdio*: fds for its stdin, stdout and
    stderr. Without *keep_fds* it inherits no other fd of the caller's (locks, pipes).
    A child whose *work* returns exits 0.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    reader, writer = os.pipe()  # both close on exec
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends in execve or _exit
        os.close(reader)
        _run(work, writer, tied=tied, detach=detach, stdio=stdio, keep_fds=keep_fds)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    said, _, failure = report.partition("\1")
    if said:
        sys.stderr.write(said)
        sys.stderr.flush()
    if failure:
        from capsid.errors import CapsidError

        Child(pid).wait()
        message, _, hint = failure.partition("\0")
        raise CapsidError(message, hint)
    return Child(pid)


def ready(report: int, said: str = "") -> None:
    """Tell the parent the set-up is done (with warnings *said*), and close *report*."""
    os.write(report, said.replace("\1", "").encode(errors="replace"))
    os.close(report)


def failed(report: int, err: BaseException, hint: str = "") -> None:
    """Send the parent *err* (a :class:`~capsid.errors.CapsidError` as it is, anything
    else as a bug of capsid's)."""
    from capsid.errors import CapsidError

    if isinstance(err, CapsidError):
        message, hint = err.message, err.hint
    else:
        message = f"internal error ({type(err).__name__}: {err})"
        hint = "this is a bug in capsid: please report it" + (f"; {hint}" if hint else "")
    os.write(report, f"\1{message}\0{hint}".encode(errors="replace"))


def _run(work: Callable[[int], object], report: int, *, tied: bool, detach: bool,
         stdio: tuple[int, int, int] | None, keep_fds: bool) -> None:  # pragma: no cover
    try:
        if detach:
            os.setsid()
        if stdio is not None:
            for fd, target in zip(stdio, (0, 1, 2), strict=True):
                os.dup2(fd, target)
        if not keep_fds:
            os.closerange(3, report)
            os.closerange(report + 1, os.sysconf("SC_OPEN_MAX"))
        if tied:
            from capsid.runtime import linux

            linux.parent_death_signal(9)  # SIGKILL when the caller dies
            if os.getppid() == 1:
                os._exit(255)  # it died already
        work(report)
        code = 0
    except BaseException as err:  # the parent must hear of it, whatever happened
        failed(report, err)
        code = 255
    os._exit(code)
