"""Running external tools (tar2sqfs, unsquashfs, squashfuse, …).

One small runner so that every tool failure becomes a :class:`ToolError` that
names the tool, its exit status and the last line it wrote to stderr, and a
missing tool names the Debian package that provides it.
"""

from __future__ import annotations

import os

from capsid.errors import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Sequence
    from typing import IO, Any

#: Debian package providing each tool capsid runs.
PACKAGES = {
    "tar2sqfs": "squashfs-tools-ng",
    "sqfs2tar": "squashfs-tools-ng",
    "rdsquashfs": "squashfs-tools-ng",
    "unsquashfs": "squashfs-tools",
    "squashfuse": "squashfuse",
    "squashfuse_ll": "squashfuse",
    "fuse-overlayfs": "fuse-overlayfs",
    "newuidmap": "uidmap",
    "newgidmap": "uidmap",
}


def which(tool: str) -> str:
    """The absolute path of *tool*, or a ToolError saying how to install it."""
    path = find(tool)
    if path is None:
        package = PACKAGES.get(tool, tool)
        raise ToolError(
            f"{tool} is not installed",
            f"install it (Debian/Ubuntu: apt-get install {package}) and try again",
        )
    return path


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of *data* in hex, without hashlib where Python has its own module:
    hashlib loads OpenSSL first, 5 ms on a container's start."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # Python 3.12 and later
        from hashlib import sha256
    return str(sha256(data).hexdigest())


def find(tool: str, path: str | None = None) -> str | None:
    """Like ``shutil.which`` (which costs milliseconds to import): *tool* on *path*, or None.

    Without *path*: the host's PATH, then /usr/sbin and /sbin, where admin tools live.
    """
    dirs = path.split(os.pathsep) if path is not None else \
        [*os.environ.get("PATH", os.defpath).split(os.pathsep), "/usr/sbin", "/sbin"]
    for directory in dirs:
        candidate = os.path.join(directory or ".", tool)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def widen_pipe(fd: int) -> None:
    """Let pipe *fd* hold 1 MiB instead of 64 KiB where the system allows it: a stream
    of hundreds of MiB into a tool then wakes it (and its writer) 16 times less often
    (a pull to SIF: 1.59 → 1.43 s on 2 cores)."""
    import contextlib
    import fcntl

    # over the user's pipe quota or fs.pipe-max-size: the default stays
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


def failure(tool: str, returncode: int, stderr: bytes | str) -> ToolError:
    """A ToolError for *tool* having exited with *returncode*."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = f": {lines[-1]}" if lines else ""
    return ToolError(
        f"{tool} failed with exit status {returncode}{detail}",
        "run again with --debug for the full command",
    )


def run(argv: Sequence[str], *, input: bytes | None = None, pass_fds: Sequence[int] = (),
        ok: Sequence[int] = (0,), timeout: float | None = None) -> bytes:
    """Run *argv* to completion and return its stdout; raise ToolError unless it exits
    with a status in *ok* within *timeout* seconds. *argv[0]* is looked up on PATH
    unless it is a path; *pass_fds* are left open for it."""
    import subprocess

    exe = argv[0] if "/" in argv[0] else which(argv[0])
    try:
        proc = subprocess.run([exe, *argv[1:]], input=input, capture_output=True,
                              pass_fds=tuple(pass_fds), timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{argv[0]} did not finish within {timeout:g} s",
                        "run again with --debug for the full command") from None
    except OSError as err:
        raise ToolError(f"cannot run {argv[0]}: {err.strerror}",
                        "check that it is installed and runs") from None
    if proc.returncode not in ok:
        raise failure(argv[0], proc.returncode, proc.stderr)
    return proc.stdout


def output(argv: Sequence[str], *, timeout: float = 30, stderr: bool = False,
           ok: Sequence[int] = (0,)) -> str | None:
    """What a program asked for information prints (with *stderr*, both streams); None
    where it is missing, exits with a status not in *ok*, or takes longer than *timeout*
    seconds."""
    import subprocess

    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode not in ok:
        return None
    return (proc.stdout + (proc.stderr if stderr else b"")).decode(errors="replace")


def start(argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen``, with Ctrl-C held back while the child starts: an interrupt
    then kills it before it is raised. (Raised inside Popen, it left a child running
    that no caller could kill: a tar2sqfs that wrote its output after capsid had removed
    it.)"""
    import signal
    import subprocess
    import threading

    if threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(argv, **options)
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        proc = subprocess.Popen(argv, **options)
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is not signal.SIG_IGN:
        proc.kill()
        proc.wait()
        if callable(previous):
            previous(signal.SIGINT, None)
        raise KeyboardInterrupt
    return proc


class reading:  # lower case: used like a function, `with tools.reading(argv) as out`
    """Run *argv* and read its stdout in a ``with`` block; raise ToolError if it fails.

    Its stderr goes to a temporary file, never a pipe that could fill and stall it;
    if the block raises, the tool is killed. (A class, not a contextlib generator: this
    module is on the container start path, and contextlib is not.)
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __enter__(self) -> IO[bytes]:
        import subprocess
        import tempfile

        self._errors = tempfile.TemporaryFile()
        self._proc = start([which(self.argv[0]), *self.argv[1:]], stdout=subprocess.PIPE,
                           stderr=self._errors)
        assert self._proc.stdout is not None
        return self._proc.stdout

    def __exit__(self, kind: type[BaseException] | None, *_exc: object) -> None:
        proc, errors = self._proc, self._errors
        with errors:
            if proc.stdout is not None:
                proc.stdout.close()
            if kind is not None:
                proc.kill()
                proc.wait()
                return
            if proc.wait() != 0:
                errors.seek(0)
                raise failure(self.argv[0], proc.returncode, errors.read())
