"""Instances: containers left running in the background, joined by ``instance://NAME``.

``instance start`` spawns the container in a session of its own (it survives the
shell that started it) running the image's ``%startscript``, if any, and then
waiting; it returns once the container runs. Its state is one JSON file per user
and name under ``$XDG_RUNTIME_DIR/capsid/instances`` (or ``~/.capsid/instances``),
with the process's start time, so that a dead instance, or a process id reused by
another program, is noticed and its entry removed, never trusted. ``exec``, ``run``
and ``shell instance://NAME`` join its namespaces with ``setns`` (user, mount and,
where it has its own, PID, IPC, UTS and network) and its root, as ``nsenter`` does.
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


def directory() -> Path:
    """Where this user's instances are recorded."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "capsid" / "instances"
    return Path.home() / ".capsid" / "instances"


def _load(path: Path) -> Instance | None:
    """The instance recorded at *path* if it still runs; a stale record is removed."""
    try:
        instance = Instance(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        instance = None
    if instance is not None and linux.start_time(instance.pid) == instance.started:
        return instance
    for stale in (path, *((Path(instance.log_out), Path(instance.log_err)) if instance
                          else ())):
        with contextlib.suppress(OSError):
            stale.unlink()
    return None


def listed() -> list[Instance]:
    """The user's running instances, sorted by name (stale records are cleaned)."""
    folder = directory()
    found = [_load(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
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
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
        (folder / "logs").mkdir(exist_ok=True, mode=0o700)
        out, err = folder / "logs" / f"{name}.out", folder / "logs" / f"{name}.err"
        try:
            with open(out, "wb") as out_f, open(err, "wb") as err_f:
                pid = api.spawn(image, ["/bin/sh", "-c", _INIT.format(script=script), name,
                                        *args], options,
                                stdout=out_f.fileno(), stderr=err_f.fileno())
        except BaseException:
            for log in (out, err):  # a start that failed leaves nothing behind
                log.unlink(missing_ok=True)
            raise
        started = linux.start_time(pid)
        if started is None:
            raise CapsidError(f"instance {name} ended as soon as it started",
                              f"see its messages in {err}")
        instance = Instance(name, pid, os.path.realpath(image), started, str(out), str(err),
                            time.time())
        output.write_bytes(state, json.dumps(asdict(instance)).encode())
    return instance


def stop(instance: Instance, signum: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Signal the instance and wait for it to end (SIGKILL after *timeout*); its record
    and logs go. False if it had to be killed."""
    gentle = True
    with contextlib.suppress(ProcessLookupError):
        os.kill(instance.pid, signum)
        deadline = time.monotonic() + timeout
        while linux.start_time(instance.pid) == instance.started:
            if time.monotonic() > deadline:
                os.kill(instance.pid, signal.SIGKILL)
                gentle = False
                deadline = time.monotonic() + 5
            time.sleep(0.02)
    _load(directory() / f"{instance.name}.json")  # gone now: removes the record and logs
    return gentle


def join(instance: Instance, action: str, argv: Sequence[str]) -> NoReturn:
    """Replace this process with *action* run inside *instance*'s namespaces and root."""
    try:
        spaces = linux.open_namespaces(instance.pid, all_kinds=True)
        cwd = os.getcwd()
    except OSError as err:
        raise CapsidError(f"cannot join instance {instance.name}: {err.strerror}",
                          "is it yours, and still running? see 'capsid instance list'"
                          ) from None
    if linux.start_time(instance.pid) != instance.started:
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
    for where in (cwd, os.environ.get("HOME", "/"), "/"):
        with contextlib.suppress(OSError):
            os.chdir(where)
            break
    command = _command(action, list(argv))
    try:
        os.execvpe(command[0], command, dict(os.environ))
    except OSError as err:
        raise CapsidError(f"{command[0]}: {err.strerror} in instance {instance.name}",
                          "check the command and the PATH inside the image") from None


def _command(action: str, argv: list[str]) -> list[str]:
    """What to run for *action*: through the image's action scripts, as Apptainer does."""
    script = f"/.singularity.d/actions/{action}"
    if os.access(script, os.X_OK):
        return [script, *argv]
    if action == "exec":
        if not argv:
            raise UsageError("no command given", "name the command to run after the instance")
        return argv
    if action == "run" and os.access("/.singularity.d/runscript", os.X_OK):
        return ["/.singularity.d/runscript", *argv]
    return ["/bin/sh", *argv]


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
