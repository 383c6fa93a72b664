"""Launching a container: namespaces, the root, binds, identity, environment, execve.

Everything happens in the calling process, which finally ``execve``s the command:
the command keeps capsid's PID, so its exit status, signals and terminal pass
through untouched. Only ``--pid`` needs a parent to stay behind (the first
process of a new PID namespace must be a child); it forwards signals and exits
as its child did.
"""

from __future__ import annotations

import os
import sys

from capsid import config, log, tools
from capsid.errors import RuntimeSetupError, UsageError
from capsid.image.locate import SANDBOX, Image
from capsid.runtime import early, identity, inroot, linux, mounts, prefetch
from capsid.runtime import env as envmod
from capsid.runtime.binds import BindSpec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


LOG = log.get(__name__)

#: cwd is not bound into the container from these places: the image's own copy wins.
_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var")


class ExecOptions:
    """How to run: everything the action verbs' flags decide (keyword arguments only)."""

    image: str
    action = "exec"
    argv: tuple[str, ...] = ()
    binds: tuple[BindSpec, ...] = ()
    home: str | None = None
    no_home = False
    no_mount: tuple[str, ...] = ()
    contain = False
    pwd: str | None = None
    cleanenv = False
    env: tuple[str, ...] = ()
    env_files: tuple[str, ...] = ()
    fakeroot = False
    pid = False
    ipc = False
    uts = False
    hostname: str | None = None
    net = False
    writable = False
    writable_tmpfs = False
    overlay: str | None = None
    tmpfs_size_mib: int | None = None
    unsquash = False
    shell: str | None = None

    def __init__(self, image: str, **options: object) -> None:
        self.image = image
        for name, value in options.items():
            if not hasattr(ExecOptions, name):
                raise TypeError(f"ExecOptions has no option {name!r}")
            setattr(self, name, value)


class _Plan:
    """Decisions taken on the host, before any namespace exists."""

    def __init__(self, image: Image, user: identity.User, userns: bool,
                 home_source: str | None, home_dest: str, binds: list[BindSpec], cwd: str,
                 bind_cwd: bool, site: config.SiteConfig, oci_env: list[str]) -> None:
        self.image, self.user, self.userns = image, user, userns
        self.home_source, self.home_dest, self.binds = home_source, home_dest, binds
        self.cwd, self.bind_cwd, self.site, self.oci_env = cwd, bind_cwd, site, oci_env


def _plan(opts: ExecOptions, started: early.Started) -> _Plan:
    site = config.load()
    image, user, userns = started.image, started.user, started.userns
    if opts.writable and image.kind != SANDBOX:
        raise UsageError(f"--writable needs a sandbox directory, and {opts.image} is a "
                         f"{image.kind} image",
                         "use --writable-tmpfs, or --overlay DIR for changes that persist")
    if opts.overlay:
        _check_overlay(opts.overlay)
    home_dest = "/root" if opts.fakeroot and not opts.home else user.home
    home_source: str | None = user.home
    if opts.home:
        src, _, dst = opts.home.partition(":")
        home_source, home_dest = os.path.realpath(os.path.expanduser(src)), dst or src
    if opts.no_home or opts.contain or not site.mount_home or "home" in opts.no_mount:
        home_source = None
    if opts.fakeroot and not opts.home:
        home_source = user.home if not (opts.no_home or opts.contain) else None
    binds = []
    for b in opts.binds:
        _check_source(b.source)
        binds.append(BindSpec(os.path.realpath(b.source), b.destination, b.readonly))
        if b.destination == "/":
            LOG.warning("binding %s onto / replaces the container's whole root filesystem "
                        "with it; bind it somewhere below / instead", b.source)
    if home_dest == "/" and home_source is not None:
        LOG.warning("--home %s puts the home directory on / and so replaces the container's "
                    "whole root filesystem with it; give a destination such as %s:/home/me",
                    opts.home, home_source)
    if home_source is not None and not os.path.isdir(home_source):
        LOG.warning("home directory %s does not exist; not binding it", home_source)
        home_source = None
    cwd = opts.pwd or os.getcwd()
    bound = [home_dest] + [b.destination for b in binds] + ["/tmp", "/var/tmp"]
    bind_cwd = (opts.pwd is None and not opts.contain and "cwd" not in opts.no_mount
                and cwd != "/" and not any(cwd == d or cwd.startswith(d + "/")
                                           for d in _SYSTEM_DIRS + tuple(bound)))
    return _Plan(image, user, userns, home_source, home_dest, binds, cwd, bind_cwd, site,
                 _oci_env(image))


def _check_source(path: str) -> None:
    """A bind source must exist and be reachable by the user: say which it is not."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise RuntimeSetupError(f"bind source {path} does not exist",
                                "create it first or fix the --bind argument") from None
    except OSError as err:
        raise RuntimeSetupError(f"cannot bind {path}: {(err.strerror or str(err)).lower()}",
                                "bind a path you can reach") from None


def _check_overlay(path: str) -> None:
    """An --overlay must be an existing directory of the user's, not the host's root."""
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        raise UsageError(f"overlay directory {path} does not exist",
                         f"create it first (mkdir -p {path}): changes to the image are kept "
                         "there")
    if not os.path.isdir(real):
        raise UsageError(f"overlay {path} is not a directory",
                         "capsid keeps overlays in directories; give an empty directory")
    if real == "/":
        raise UsageError("the overlay directory cannot be /",
                         "give an empty directory of your own")
    if not os.access(real, os.W_OK | os.X_OK):
        raise UsageError(f"you cannot write to the overlay directory {path}",
                         "give a directory of your own")


def _open_image(image: Image) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if image.kind == SANDBOX else 0)
    return os.open(image.path, flags)


def _mount_image(plan: _Plan, opts: ExecOptions, fd: int, started: early.Started) -> None:
    image, fuse_mount = plan.image, started.fuse_mount
    target = f"{mounts.SESSION}{mounts.IMAGE}"
    if image.kind == SANDBOX:
        mounts.bind_sandbox(fd)
    elif fuse_mount is not None:
        from capsid.runtime import fuse  # imported by early.start, before /tmp was covered

        if isinstance(fuse_mount, fuse.Served):
            fuse_mount.attach(target)
            return
        fuse.mount(fuse_mount, target)
        prefetch.start(os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                       started.first_programs)
    elif not plan.userns and not opts.unsquash:
        mounts.mount_kernel_squashfs(fd, image.offset)
    else:
        mounts.unpack_image(fd, image.offset)


def _check_served(image: Image) -> None:
    """Fail clearly if squashfuse could not serve the image (it waits for the server)."""
    try:
        os.stat(f"{mounts.SESSION}{mounts.IMAGE}")
    except OSError as err:
        raise RuntimeSetupError(
            f"squashfuse could not read {image.path} ({err.strerror}): its squashfs "
            "filesystem is damaged or of a kind squashfuse does not know",
            f"check it with 'unsquashfs -s -o {image.offset} {image.path}', or rebuild it"
        ) from None


def _exit_like(status: int) -> NoReturn:
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


def _supervise(child: int, status_pipe: int) -> NoReturn:
    """--pid, outside: forward signals to the namespace's init, exit as the command did."""
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
    _exit_like(int(reported) if reported else status)


def _init(command: int, status_pipe: int) -> NoReturn:
    """--pid, inside: PID 1 reaps orphans and hands signals to the command (PID 2).

    The kernel drops signals sent to a namespace's PID 1 that it has no handler for,
    so the command must not be PID 1 or Slurm's SIGTERM would never reach it.
    """
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
            os._exit(0)


def _set_hostname(name: str) -> None:
    import _socket

    _socket.sethostname(name)


def _loopback_up() -> None:
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


def _default_mounts(plan: _Plan, opts: ExecOptions) -> None:
    site, no = plan.site, set(opts.no_mount)
    if site.mount_proc and "proc" not in no:
        mounts.mount_proc(opts.pid)
    if site.mount_sys and "sys" not in no:
        mounts.bind_into("/sys", "/sys", required=False)
    if "dev" not in no:
        if opts.contain or site.mount_dev == "minimal":
            mounts.mount_minimal_dev()
        elif site.mount_dev != "no":
            mounts.bind_into("/dev", "/dev", nodev=False, required=False)
    if "bind-paths" not in no:
        for spec in site.bind_paths:
            src, _, dst = spec.partition(":")
            if src in no or (dst or src) in no:
                continue
            mounts.bind_into(os.path.realpath(src), dst or src, required=False)


def _mount_points(plan: _Plan, opts: ExecOptions) -> list[tuple[str, bool]]:
    """Where the mounts of _container_mounts will land: (path, is a directory)."""
    points = [("/proc", True), ("/sys", True), ("/dev", True), (plan.home_dest, True),
              ("/tmp", True), ("/var/tmp", True), ("/etc/passwd", False),
              ("/etc/group", False), ("/etc/resolv.conf", False)]
    for spec in plan.site.bind_paths:
        src, _, dst = spec.partition(":")
        points.append((dst or src, os.path.isdir(f"{mounts.OLD}{src}")))
    points += [(b.destination, os.path.isdir(f"{mounts.OLD}{b.source}")) for b in plan.binds]
    if opts.hostname:
        points.append(("/etc/hostname", False))
    if plan.bind_cwd:
        points.append((plan.cwd, True))
    return points


def _container_mounts(plan: _Plan, opts: ExecOptions) -> None:
    _default_mounts(plan, opts)
    if plan.home_source is not None:
        mounts.bind_into(plan.home_source, plan.home_dest)
    else:
        mounts.ensure_target(mounts.FINAL, plan.home_dest, True)
    for b in plan.binds:
        mounts.bind_into(b.source, b.destination, readonly=b.readonly)
    if plan.site.mount_tmp and "tmp" not in opts.no_mount and not opts.contain:
        mounts.bind_into("/tmp", "/tmp", required=False)
        mounts.bind_into(os.path.realpath("/var/tmp"), "/var/tmp", required=False)
    if not opts.fakeroot:
        passwd = _read_image_file("/etc/passwd")
        if passwd is None:
            LOG.info("the image has no /etc/passwd; adding one")
        mounts.bind_file(identity.passwd(passwd, plan.user, plan.home_dest), "passwd",
                         "/etc/passwd")
        mounts.bind_file(identity.group(_read_image_file("/etc/group"), plan.user), "group",
                         "/etc/group")
    if os.path.exists(f"{mounts.OLD}/etc/resolv.conf"):
        mounts.bind_into(os.path.realpath("/etc/resolv.conf"), "/etc/resolv.conf",
                         required=False)
    if opts.hostname:
        mounts.bind_file(f"{opts.hostname}\n".encode(), "hostname", "/etc/hostname")
    if plan.bind_cwd:
        mounts.bind_into(plan.cwd, plan.cwd, required=False)


def _read_image_file(path: str) -> bytes | None:
    root = os.open(mounts.FINAL, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = inroot.open_file(root, path)
    finally:
        os.close(root)
    if fd is None:
        return None
    with open(fd, "rb") as f:
        return f.read(1 << 24)


def _command(opts: ExecOptions) -> list[str]:
    if opts.action == "exec":
        if not opts.argv:
            raise UsageError("no command given", "name the command to run after the image")
        return list(opts.argv)
    if opts.action == "run":
        return ["/.singularity.d/runscript", *opts.argv]
    if opts.action == "test":
        return ["/.singularity.d/test", *opts.argv]
    shell = opts.shell or next((s for s in ("/bin/bash", "/bin/sh") if os.access(s, os.X_OK)),
                               "/bin/sh")
    return [shell, "--norc", *opts.argv] if shell.endswith("/bash") else [shell, *opts.argv]


def _exec(plan: _Plan, opts: ExecOptions) -> NoReturn:
    argv = _command(opts)
    if opts.action in ("run", "test") and not os.path.exists(argv[0]):
        if opts.action == "test":
            print("capsid: no test script in this container", file=sys.stderr)
            os._exit(0)
        raise RuntimeSetupError("this container has no runscript",
                                "use 'capsid exec IMAGE COMMAND' to run a command in it")
    if opts.action in ("run", "test") and not os.access(argv[0], os.X_OK):
        argv.insert(0, "/bin/sh")  # a script saved without its execute bit still runs
    extra = {
        "APPTAINER_CONTAINER": str(os.path.abspath(opts.image)),
        "APPTAINER_NAME": os.path.basename(os.path.normpath(opts.image)),
        "APPTAINER_COMMAND": opts.action,
        "SINGULARITY_CONTAINER": str(os.path.abspath(opts.image)),
        "SINGULARITY_NAME": os.path.basename(os.path.normpath(opts.image)),
        "SINGULARITY_COMMAND": opts.action,
    }
    env_options = envmod.EnvOptions(opts.cleanenv, opts.env, opts.env_files, plan.home_dest,
                                    extra)
    if opts.action == "shell":
        # A prompt that says where you are; --env PS1=... still wins.
        env_options = envmod.EnvOptions(opts.cleanenv, ("PS1=Capsid> ", *opts.env),
                                        opts.env_files, plan.home_dest, extra)
    use_shell = os.access("/bin/sh", os.X_OK)
    finished = None
    if use_shell:
        scripts = _env_scripts()
        finished = envmod.finished_env(env_options, scripts) if scripts is not None else None
    if finished is not None:
        environment = finished
        environment["PWD"] = os.getcwd()  # as the shell would have exported it
    else:
        environment = envmod.container_env(env_options, use_prelude=use_shell,
                                           oci_env=plan.oci_env)
    linux.no_new_privs()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if use_shell and finished is None:
            os.execve("/bin/sh", ["/bin/sh", "-c", envmod.PRELUDE, "capsid", *argv],
                      environment)
        path = argv[0] if "/" in argv[0] else tools.find(argv[0], environment["PATH"])
        if path is None:
            raise RuntimeSetupError(f"{argv[0]}: command not found in the container",
                                    "check the name and the PATH inside the image "
                                    f"({environment['PATH']})")
        os.execve(path, argv, environment)
    except OSError as err:
        if err.errno == 5:  # EIO: what squashfuse answers for blocks it cannot decompress
            raise RuntimeSetupError(
                f"cannot read {argv[0]} from {opts.image}: the image is damaged "
                "(input/output error)", "rebuild or download the image again") from None
        raise RuntimeSetupError(f"cannot run {argv[0]}: {err.strerror}",
                                "check that it is an executable for this machine") from None


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
        try:
            with open(f"/.singularity.d/env/{name}", "rb") as f:
                scripts[name] = f.read(65536)
        except OSError:
            return None
    return scripts


def _oci_env(image: Image) -> list[str]:
    """The OCI ``Env`` stored in a SIF, for images without a shell to source env scripts."""
    if image.oci_config is None:
        return []
    offset, size = image.oci_config
    with open(image.path, "rb") as f:
        f.seek(offset)
        raw = f.read(size)
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        return []
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict) and "Env" not in doc:
        doc = doc["config"]
    value = doc.get("Env") if isinstance(doc, dict) else None
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def start_early(opts: ExecOptions) -> early.Started:
    """The first steps of :func:`launch` (see :mod:`capsid.runtime.early`)."""
    return early.start(opts.image, fakeroot=opts.fakeroot, unsquash=opts.unsquash,
                       first_programs=early.programs(opts.action, opts.argv, opts.shell))


def launch(opts: ExecOptions, started: early.Started | None = None) -> NoReturn:
    """Run the container described by *opts* in place of this process.

    *started* is what :func:`capsid.runtime.early.start` returned, if the caller
    ran it already (it should, as early as it can).
    """
    started = started or start_early(opts)
    plan = _plan(opts, started)
    flags = linux.CLONE_NEWNS
    flags |= linux.CLONE_NEWPID if opts.pid else 0
    flags |= linux.CLONE_NEWIPC if opts.ipc else 0
    flags |= linux.CLONE_NEWUTS if opts.uts or opts.hostname else 0
    flags |= linux.CLONE_NEWNET if opts.net else 0
    try:
        linux.unshare(flags)
    except OSError as err:
        raise RuntimeSetupError(f"cannot create namespaces: {err.strerror}",
                                "run without --pid/--ipc/--uts/--net, or ask an administrator "
                                "to allow them") from None
    status_pipe = -1
    if opts.pid:
        reader, status_pipe = os.pipe()
        child = os.fork()
        if child:
            os.close(status_pipe)
            _supervise(child, reader)
        os.close(reader)
        linux.parent_death_signal(9)  # SIGKILL: die with the supervisor
    if opts.hostname:
        _set_hostname(opts.hostname)
    if opts.net:
        _loopback_up()
    fd = _open_image(plan.image)  # now, so that a sandbox is in this mount namespace
    mounts.start_session(opts.tmpfs_size_mib or plan.site.tmpfs_size_mib)
    _mount_image(plan, opts, fd, started)
    os.close(fd)
    if started.fuse_mount is not None:
        _check_served(plan.image)
    mounts.enter_session()
    overlay = f"{mounts.OLD}{os.path.realpath(opts.overlay)}" if opts.overlay else None
    if overlay is None and not opts.writable:
        mounts.prepare_upper(_mount_points(plan, opts))
    mounts.make_root(overlay, userns=plan.userns, writable_image=opts.writable)
    _container_mounts(plan, opts)
    readonly = not (opts.writable or opts.writable_tmpfs or opts.overlay)
    mounts.finish(readonly_root=readonly)
    target = plan.cwd if os.path.isdir(plan.cwd) else plan.home_dest
    try:
        os.chdir(target)
    except OSError:
        LOG.warning("%s does not exist in the container; starting in /", plan.cwd)
        os.chdir("/")
    if opts.pid:
        command = os.fork()
        if command:
            _init(command, status_pipe)
        os.close(status_pipe)
    if started.fuse_mount is not None:
        started.fuse_mount.reap()
    if started.affinity is not None:
        os.sched_setaffinity(0, started.affinity)
    _exec(plan, opts)
