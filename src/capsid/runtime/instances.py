"""Instances: containers left running in the background, joined by ``instance://NAME``.

``instance start`` spawns the container in a session of its own (it survives the
shell that started it) running the image's ``%startscript``, if any, and then
waiting; it returns once the container runs. Its state is one JSON file per user
and name under ``$XDG_RUNTIME_DIR/capsid/instances`` (or ``~/.capsid/instances``),
with the process's start time, so that a dead instance, or a process id reused by
another program, is noticed and its entry removed, never trusted. ``exec``, ``run``
and ``shell instance://NAME`` join its namespaces with ``setns`` (user, mount and,
where it has its own, PID, IPC, UTS and network) and its root, as ``nsenter`` does.

Records are not trusted: one is read only from the caller's private folder, only if it
is a regular file of the caller's; the log paths are derived from the name, never
taken from the record; and a process is signalled only if it is the caller's, its
start time matches and it still lives in the user namespace recorded at the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from capsid.errors import CapsidError, UsageError
from capsid.runtime import linux
from capsid.runtime.options import Options

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the container's command: %startscript (or, for ``instance run``, the runscript) in
#: the background, then wait until stopped
_INIT = ('trap "exit 0" TERM INT; '
         'if [ -x /.singularity.d/{script} ]; then /.singularity.d/{script} "$@" & fi; '
         'while :; do sleep 86400 & wait $!; done')


@dataclass
class Instance:
    """A running instance, as its state file records it."""

    name: str
    pid: int  #: the container's first process (its supervisor with --pid)
    image: str
    started: int  #: the process's start time (clock ticks after boot), against pid reuse
    log_out: str
    log_err: str
    created: float
    #: the container's user and mount namespaces (their inodes): a process outside them
    #: is not the instance, whatever its id and start time
    userns: int = 0
    mntns: int = 0


def directory() -> Path:
    """Where this user's instances are recorded (made private, see :mod:`capsid.hostfs`)."""
    from capsid import hostfs

    try:
        return Path(hostfs.runtime_dir("instances", str(Path.home() / ".capsid")))
    except OSError as err:
        raise CapsidError(f"cannot keep instance records: {err.strerror}: "
                          f"{err.filename or ''}", "check $XDG_RUNTIME_DIR and $HOME") from None


def _logs(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / "logs" / f"{name}.out", folder / "logs" / f"{name}.err"


def _read(path: Path) -> Instance | None:
    """The record at *path*, if it is a sound one of the caller's (else None)."""
    from capsid import hostfs

    name = path.name.removesuffix(".json")
    try:
        data = hostfs.read_nofollow(str(path), 64 << 10)
        info = os.lstat(path)
        if data is None or not hostfs.owned_by_caller(info.st_uid):
            return None
        fields = json.loads(data)
        instance = Instance(**fields)
    except (OSError, ValueError, TypeError, hostfs.Refused):
        return None
    numbers = (instance.pid, instance.started, instance.userns, instance.mntns)
    if instance.name != name or not all(isinstance(n, int) and n > 1 for n in numbers):
        return None
    out, err = _logs(path.parent, name)
    instance.log_out, instance.log_err = str(out), str(err)  # never the record's own paths
    return instance


def _alive(instance: Instance) -> bool:
    """Whether the recorded process still runs: the same start time, the caller's, and
    in the namespaces recorded when it started."""
    if linux.start_time(instance.pid) != instance.started:
        return False
    try:
        return os.stat(f"/proc/{instance.pid}").st_uid == os.getuid() and \
            _namespaces(instance.pid) == (instance.userns, instance.mntns)
    except OSError:
        return False


def _namespaces(pid: int) -> tuple[int, int]:
    return (os.stat(f"/proc/{pid}/ns/user").st_ino, os.stat(f"/proc/{pid}/ns/mnt").st_ino)


def _load(path: Path) -> Instance | None:
    """The instance recorded at *path* if it still runs; a stale record of the caller's is
    removed with its logs."""
    if not _NAME.fullmatch(path.name.removesuffix(".json")):
        return None
    instance = _read(path)
    if instance is not None and _alive(instance):
        return instance
    if instance is not None or _is_own_file(path):
        for stale in (path, *_logs(path.parent, path.name.removesuffix(".json"))):
            with contextlib.suppress(OSError):
                stale.unlink()  # unlink does not follow links; the folder is private
    return None


def _is_own_file(path: Path) -> bool:
    from capsid import hostfs

    try:
        return hostfs.owned_by_caller(os.lstat(path).st_uid)
    except OSError:
        return False


def listed() -> list[Instance]:
    """The user's running instances, sorted by name (stale records are cleaned)."""
    folder = directory()
    found = [_load(p) for p in sorted(folder.glob("*.json"))]
    return [i for i in found if i is not None]


def find(name: str) -> Instance:
    instance = _load(directory() / f"{name}.json") if _NAME.fullmatch(name) else None
    if instance is None:
        raise UsageError(f"no instance named {name!r} is running",
                         "see 'capsid instance list'")
    return instance


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    folder = directory()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(fd)


def start(image: str, name: str, args: Sequence[str], options: Options,
          script: str = "startscript") -> Instance:
    """Start instance *name* of *image* running its %startscript (or *script*, e.g.
    ``runscript``) with *args*."""
    if not _NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not a valid instance name",
                         "use letters, digits, '.', '_' and '-' (at most 64)")
    from capsid.image import output
    from capsid.runtime import api

    with _locked() as folder:
        state = folder / f"{name}.json"
        if _load(state) is not None:
            raise UsageError(f"an instance named {name!r} is running already",
                             f"stop it first (capsid instance stop {name}) or choose "
                             "another name")
        from capsid import hostfs

        hostfs.private_dir(str(folder / "logs"), "runtime directory", parents=False)
        out, err = _logs(folder, name)
        made: list[Path] = []
        try:
            out_fd, err_fd = _new_log(out, made), _new_log(err, made)
            try:
                pid = api.spawn(image, ["/bin/sh", "-c", _INIT.format(script=script), name,
                                        *args], options, stdout=out_fd, stderr=err_fd)
            finally:
                os.close(out_fd)
                os.close(err_fd)
        except BaseException:
            for log in made:  # a start that failed leaves nothing behind
                log.unlink(missing_ok=True)
            raise
        started = linux.start_time(pid)
        try:
            userns, mntns = _namespaces(pid)
        except OSError:
            started = None
        if started is None:
            raise CapsidError(f"instance {name} ended as soon as it started",
                              f"see its messages in {err}")
        instance = Instance(name, pid, os.path.realpath(image), started, str(out), str(err),
                            time.time(), userns, mntns)
        output.write_bytes(state, json.dumps(asdict(instance)).encode())
    return instance


def _new_log(path: Path, made: list[Path]) -> int:
    """A new log file at *path*, never through a link or into an existing file."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale one of a dead instance
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    made.append(path)
    return fd


def stop(instance: Instance, signum: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Signal the instance and wait for it to end (SIGKILL after *timeout*); its record
    and logs go. False if it had to be killed. Only a process that is still the
    instance (:func:`_alive`) is signalled."""
    gentle = True
    if not _alive(instance):
        _load(directory() / f"{instance.name}.json")
        return gentle
    with contextlib.suppress(ProcessLookupError):
        os.kill(instance.pid, signum)
        deadline = time.monotonic() + timeout
        while _alive(instance):
            if time.monotonic() > deadline:
                os.kill(instance.pid, signal.SIGKILL)
                gentle = False
                deadline = time.monotonic() + 5
            time.sleep(0.02)
    _load(directory() / f"{instance.name}.json")  # gone now: removes the record and logs
    return gentle


def join(instance: Instance, action: str, argv: Sequence[str], options: Options
         ) -> NoReturn:
    """Replace this process with *action* run inside *instance*'s namespaces and root."""
    from capsid.runtime import container

    def enter() -> None:
        try:
            spaces = linux.open_namespaces(instance.pid, all_kinds=True)
        except OSError as err:
            raise CapsidError(f"cannot join instance {instance.name}: {err.strerror}",
                              "is it yours, and still running? see 'capsid instance list'"
                              ) from None
        if not _alive(instance):
            raise UsageError(f"instance {instance.name} has ended", "start it again")
        try:
            new_pid = spaces.enter()
        except OSError as err:
            raise CapsidError(f"cannot join instance {instance.name}: {err.strerror}",
                              "it may belong to another user") from None
        if new_pid:  # only children enter a PID namespace
            child = os.fork()
            if child:
                _wait_and_exit(child)

    container.join(instance.image, action, tuple(argv), options, enter)


def _wait_and_exit(child: int) -> NoReturn:
    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(forwarded, lambda s, _f: os.kill(child, s))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sys.exit(os.waitstatus_to_exitcode(status))
