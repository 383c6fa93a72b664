"""The container's command: its argv and environment, then ``execve``.

The last step of a start, run inside the container's root (:mod:`capsid.runtime.container`,
or a rank joining a shared one, :mod:`capsid.runtime.sharens`). The command replaces this
process, so its exit status, signals and terminal are capsid's own.
"""

from __future__ import annotations

import os
import stat
import sys

import capsid
from capsid import tools
from capsid.errors import RuntimeSetupError, UsageError
from capsid.image import stock
from capsid.runtime import env as envmod
from capsid.runtime import identity, linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from capsid.runtime.ops import Environment
    from capsid.runtime.plan import Plan


def _command(plan: Plan) -> list[str]:
    action, args = plan.action, plan.argv
    if action == "exec":
        if not args:
            raise UsageError("no command given", "name the command to run after the image")
        return list(args)
    app = plan.options.app
    if app is not None and action in ("run", "test"):
        return [f"/scif/apps/{app}/scif/{'runscript' if action == 'run' else 'test'}", *args]
    if action == "run":
        if plan.oci_command is not None and not os.access("/bin/sh", os.X_OK):
            # no shell for the generated runscript (FROM scratch): ENTRYPOINT and CMD
            # themselves, as docker run starts them
            entrypoint, cmd, workdir = plan.oci_command
            if workdir and plan.options.pwd is None:
                os.chdir(workdir)
            if entrypoint or cmd or args:
                return [*entrypoint, *(args or cmd)]
        return ["/.singularity.d/runscript", *args]
    if action == "test":
        return ["/.singularity.d/test", *args]
    shell = plan.options.shell or next(
        (s for s in ("/bin/bash", "/bin/sh") if os.access(s, os.X_OK)), "/bin/sh")
    return [shell, "--norc", *args] if shell.endswith("/bash") else [shell, *args]


def enter_cwd(plan: Plan) -> None:
    """Start in the working directory. One named with ``--pwd`` must be there (as in
    Apptainer); the host's, where the container lacks it, gives way to the home
    directory, else /, with a warning."""
    try:
        os.chdir(plan.cwd)
        return
    except OSError as err:
        why = (err.strerror or str(err)).lower()
    if plan.options.pwd is not None:
        from capsid.errors import UsageError

        raise UsageError(f"--pwd {plan.cwd}: {why} in the container",
                         "give a directory of the image, or one bound into it")
    from capsid import log

    for where in (plan.home_dest, "/"):
        try:
            os.chdir(where)
        except OSError:
            continue
        log.get(__name__).warning("%s is not in the container (%s); starting in %s",
                                  plan.cwd, why, where)
        return


def run(plan: Plan, added: Environment, root_emulation: object | None = None) -> NoReturn:
    """Replace this process with *plan*'s command, with the variables its mounts *added*
    (with *root_emulation*, the builder's seccomp filter, loaded last)."""
    opts, action = plan.options, plan.action
    argv = _command(plan)
    if opts.app is not None and not os.path.isdir(f"/scif/apps/{opts.app}"):
        raise RuntimeSetupError(f"this container has no SCIF app called {opts.app!r}",
                                "see 'capsid inspect --list-apps IMAGE' for its apps")
    if action in ("run", "test") and not os.path.exists(argv[0]):
        what = f"app {opts.app}" if opts.app is not None else "this container"
        if action == "test":
            print(f"capsid: no test script in {what}", file=sys.stderr)
            os._exit(0)
        raise RuntimeSetupError(f"{what} has no runscript",
                                "use 'capsid exec IMAGE COMMAND' to run a command in it")
    if action in ("run", "test") and not os.access(argv[0], os.X_OK):
        argv.insert(0, "/bin/sh")  # a script saved without its execute bit still runs
    use_shell = False
    if opts.environment is not None:
        environment = dict(opts.environment)
        environment.setdefault("PATH", stock.DEFAULT_PATH)
    else:
        environment, use_shell = _environment(plan, added)
    if plan.confined:  # a build step, or a root build's %test
        from capsid.runtime import userns  # imported before pivot_root, by launch

        userns.confine_build_step()
    if opts.user:
        identity.become(opts.user, environment)
    linux.no_new_privs()
    if opts.no_umask:
        os.umask(0o022)
    if root_emulation is not None:
        from capsid.runtime import rootemu  # imported before pivot_root, by launch

        rootemu.load(root_emulation)
    sys.stdout.flush()
    sys.stderr.flush()
    capsid.mark("exec")
    capsid.write_marks()
    try:
        if use_shell:
            os.execve("/bin/sh", ["/bin/sh", "-c", envmod.PRELUDE, "capsid", *argv],
                      environment)
        path = argv[0] if "/" in argv[0] else tools.find(argv[0], environment["PATH"])
        if path is None:
            # Apptainer's words, which clients (cwltool) look for
            raise RuntimeSetupError(f'"{argv[0]}": executable file not found in $PATH of the '
                                    "container",
                                    "check the name and the PATH inside the image "
                                    f"({environment['PATH']})")
        os.execve(path, argv, environment)
    except OSError as err:
        if err.errno == 5:  # EIO: what squashfuse answers for blocks it cannot decompress
            raise RuntimeSetupError(
                f"cannot read {argv[0]} from {plan.name}: the image is damaged "
                "(input/output error)", "rebuild or download the image again") from None
        if err.errno == 2 and os.path.exists(argv[0]):  # ENOENT: its interpreter is missing
            raise RuntimeSetupError(
                f"cannot run {argv[0]}: its interpreter {_interpreter(argv[0])} is not in "
                "the image", "run a program the image has with 'capsid exec'") from None
        raise RuntimeSetupError(f"cannot run {argv[0]}: {err.strerror}",
                                "check that it is an executable for this machine") from None


def _interpreter(path: str) -> str:
    """The program named by *path*'s ``#!`` line (or its ELF loader, unnamed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return "(unknown)"
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        return words[0].decode(errors="replace") if words else "(none)"
    return "(its ELF loader)"


def _environment(plan: Plan, added: Environment) -> tuple[dict[str, str], bool]:
    """The command's environment, and whether /bin/sh must source the image's scripts first."""
    opts, action = plan.options, plan.action
    where = os.path.abspath(plan.name)
    name = os.path.basename(os.path.normpath(plan.name))
    extra = {"APPTAINER_CONTAINER": where, "APPTAINER_NAME": name, "APPTAINER_COMMAND": action,
             "SINGULARITY_CONTAINER": where, "SINGULARITY_NAME": name,
             "SINGULARITY_COMMAND": action, **added.extra}
    if opts.app is not None:  # read by the image's 95-apps.sh
        extra["SINGULARITY_APPNAME"] = extra["APPTAINER_APPNAME"] = opts.app
    # In a shell, a prompt that says where you are; --env PS1=... still wins.
    forced = ("PS1=Capsid> ", *opts.env) if action == "shell" else opts.env
    env_options = envmod.EnvOptions(opts.cleanenv, forced, plan.env_file_values,
                                    plan.home_dest, extra, added.pinned, no_eval=opts.no_eval,
                                    no_env=opts.no_env)
    if not os.access("/bin/sh", os.X_OK):
        return envmod.container_env(env_options, use_prelude=False,
                                    oci_env=plan.oci_env), False
    scripts = _env_scripts()
    finished = envmod.finished_env(env_options, scripts) if scripts is not None else None
    if finished is not None:
        finished["PWD"] = os.getcwd()  # as the shell would have exported it
        return finished, False
    return envmod.container_env(env_options, use_prelude=True, oci_env=plan.oci_env), True


def _env_scripts() -> dict[str, bytes] | None:
    """The image's /.singularity.d/env/*.sh (name → content); None if one cannot be read."""
    try:
        names = [n for n in os.listdir("/.singularity.d/env") if n.endswith(".sh")]
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    scripts = {}
    for name in names:
        try:  # inside the container's root already; non-blocking: a FIFO cannot hang it
            fd = os.open(f"/.singularity.d/env/{name}", os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb", buffering=0) as f:  # unbuffered: no isatty() round trip
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                scripts[name] = f.read(65536)
        except OSError:
            return None
    return scripts
