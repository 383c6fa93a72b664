"""The runtime as a library: run a container from Python, without the CLI.

    from capsid.runtime import api
    from capsid.runtime.options import Options

    status = api.run("docker://debian:12", ["cat", "/etc/os-release"], Options(cleanenv=True))

:func:`exec_container` replaces the calling process with the container (what the
CLI does: exit codes, signals and the terminal pass straight through); :func:`run`
runs it as a child and returns its exit status (what the builder does for each step).
Images are anything the CLI takes: a SIF, a squashfs, a sandbox, a URI of
:data:`CONVERTED` (converted once, then cached), or a
:class:`~capsid.runtime.options.Layers`.
"""

from __future__ import annotations

import os

from capsid.runtime import early

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import NoReturn

    from capsid.runtime.options import Layers, Options

ACTIONS = ("exec", "run", "shell", "test")
#: images given by URI, run from a SIF converted once into the cache (as Apptainer does)
CONVERTED = ("docker://", "oras://", "docker-archive:", "oci-archive:", "oci:")


def resolve(image: str, options: Options | None = None) -> str:
    """The local image to run for *image*: images given by URI (registries, archives,
    OCI layouts) are converted and cached once."""
    if image.startswith(CONVERTED):
        import gc

        from capsid.oci.sources import cached_for_run

        gc.enable()  # a download and conversion: off only for a start (cli.main)
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
                       unsquash=options.unsquash or _unsquash_by_default(),
                       first_programs=early.programs(action, tuple(argv), options.shell),
                       subordinate_ids=not (options.root_emulation or options.ignore_subuid))


def _unsquash_by_default() -> bool:
    """The site's ``unsquash ranks``: jobs with that many ranks on a node run unpacked."""
    from capsid.runtime.options import LAUNCHER_VARIABLES

    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return False
    from capsid import config
    from capsid.runtime import unsquashed

    return unsquashed.by_default(config.load())


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
    container up is raised here as a :class:`~capsid.errors.CapsidError`.
    """
    if isinstance(image, str):
        image = resolve(image, options)
    from capsid.runtime import child

    return child.start(_container(image, argv, options, action)).wait()


def spawn(image: str | Layers, argv: Sequence[str], options: Options, *, stdout: int,
          stderr: int) -> int:
    """Start the container in the background, in a session of its own with its output
    to *stdout* and *stderr* (fds), and return its process id once its command runs.

    It outlives the caller (an instance). A failure to set it up is raised here.
    """
    if isinstance(image, str):
        image = resolve(image, options)
    from capsid.runtime import child

    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return child.start(_container(image, argv, options, "exec"), tied=False, detach=True,
                           stdio=(null, stdout, stderr), keep_fds=False).pid
    finally:
        os.close(null)


def _container(image: str | Layers, argv: Sequence[str], options: Options,
               action: str) -> Callable[[int], NoReturn]:
    def work(report: int) -> NoReturn:  # pragma: no cover - the child ends in execve
        from capsid.runtime import pid1

        pid1.REPORT_FDS.append(report)  # --pid: the processes that never exec close it
        exec_container(image, argv, options, action)

    return work
