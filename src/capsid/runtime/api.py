"""The runtime as a library: run a container from Python, without the CLI.

    from capsid.runtime import api
    from capsid.runtime.options import Options

    status = api.run("docker://debian:12", ["cat", "/etc/os-release"], Options(cleanenv=True))

:func:`exec_container` replaces the calling process with the container (what the
CLI does: exit codes, signals and the terminal pass straight through); :func:`run`
runs it as a child and returns its exit status (what the builder does for each step).
Images are anything the CLI takes: a SIF, a squashfs, a sandbox, ``docker://`` or
``oras://`` (converted once, then cached), or a :class:`~capsid.runtime.options.Layers`.
"""

from __future__ import annotations

import os
import sys

from capsid.runtime import early

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

    from capsid.runtime.options import Layers, Options

ACTIONS = ("exec", "run", "shell", "test")


def resolve(image: str, options: Options | None = None) -> str:
    """The local image to run for *image*: registry images are converted and cached once."""
    if image.startswith(("docker://", "oras://")):
        from capsid.oci.sources import cached_for_run

        return cached_for_run(image, nohttps=options is not None and options.no_https)
    return image


def start(image: str | Layers, options: Options, action: str = "exec",
          argv: Sequence[str] = ()) -> early.Started:
    """The user namespace and the image's server: what a start should do first.

    Callers that can (the CLI) do this before importing the rest of the runtime, so
    squashfuse starts meanwhile. *image* must be resolved already.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    return early.start(image, fakeroot=options.fakeroot or options.root_emulation,
                       unsquash=options.unsquash,
                       first_programs=early.programs(action, tuple(argv), options.shell),
                       subordinate_ids=not (options.root_emulation or options.ignore_subuid))


def exec_container(image: str | Layers, argv: Sequence[str], options: Options,
                   action: str = "exec", started: early.Started | None = None) -> NoReturn:
    """Replace this process with the container running *argv* (or the *action*'s command).

    The one way in: ``instance://NAME`` joins a running instance, registry images are
    converted (once), a launcher's ranks join their node's shared container when
    :meth:`Options.shares` says so, and any other start goes through :func:`start`
    (squashfuse starts while the rest of the runtime is imported) and the launch.
    """
    if isinstance(image, str) and started is None:
        if image.startswith("instance://"):
            from capsid.runtime import instances

            instances.join(instances.find(image.removeprefix("instance://")), action, argv,
                           options)
        image = resolve(image, options)
        if options.shares():
            from capsid.runtime import sharens

            sharens.run(image, options, action, list(argv))  # returns where it cannot share
    started = started or start(image, options, action, argv)
    from capsid.runtime.container import launch

    launch(image, action, tuple(argv), options, started)


def run(image: str | Layers, argv: Sequence[str], options: Options,
        action: str = "exec") -> int:
    """Run the container as a child process and return its command's exit status.

    A status above 128 is a death by signal, as a shell reports it. A failure to set the
    container up is raised here as a :class:`~capsid.errors.CapsidError` (the child
    reports it through a pipe that closes by itself when the command starts).
    """
    if isinstance(image, str):
        image = resolve(image, options)
    sys.stdout.flush()
    sys.stderr.flush()
    reader, writer = os.pipe()  # both close on exec
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends in execve or _exit
        os.close(reader)
        _child(image, argv, options, action, writer)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if report:
        from capsid.errors import CapsidError

        message, _, hint = report.partition("\0")
        raise CapsidError(message, hint)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def spawn(image: str | Layers, argv: Sequence[str], options: Options, *, stdout: int,
          stderr: int) -> int:
    """Start the container in the background, in a session of its own with its output
    to *stdout* and *stderr* (fds), and return its process id once its command runs.

    It outlives the caller (an instance). A failure to set it up is raised here.
    """
    if isinstance(image, str):
        image = resolve(image, options)
    sys.stdout.flush()
    sys.stderr.flush()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends in execve or _exit
        os.close(reader)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        os.closerange(3, writer)  # nothing of the caller's (locks, pipes) lives on in it
        os.closerange(writer + 1, os.sysconf("SC_OPEN_MAX"))
        _child(image, argv, options, "exec", writer, tied=False)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    if report:
        from capsid.errors import CapsidError

        os.waitpid(pid, 0)
        message, _, hint = report.partition("\0")
        raise CapsidError(message, hint)
    return pid


def _child(image: str | Layers, argv: Sequence[str], options: Options, action: str,
           report: int, tied: bool = True) -> NoReturn:
    from capsid.errors import CapsidError
    from capsid.runtime import linux, pid1

    try:
        pid1.REPORT_FDS.append(report)  # --pid: the processes that never exec close it
        if tied:
            linux.parent_death_signal(9)  # SIGKILL when the caller dies (kill -9 of a build)
            if os.getppid() == 1:
                os._exit(255)  # it died already
        exec_container(image, argv, options, action)
    except CapsidError as err:
        os.write(report, f"{err.message}\0{err.hint}".encode(errors="replace"))
    except BaseException as err:  # the parent must hear of it, whatever happened
        os.write(report, f"internal error ({type(err).__name__}: {err})\0this is a bug in "
                         "capsid: please report it".encode(errors="replace"))
    os._exit(255)
