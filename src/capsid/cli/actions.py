"""``capsid exec|run|shell|test``: Apptainer's action commands and their flags."""

from __future__ import annotations

import argparse

from capsid import config
from capsid.cli.parser import parser
from capsid.errors import CapsidError

_USAGE = {
    "exec": ("[options] IMAGE COMMAND [ARGS...]", "Run COMMAND inside a container of IMAGE."),
    "run": ("[options] IMAGE [ARGS...]",
            "Run IMAGE's runscript (for images from OCI: ENTRYPOINT and CMD) with ARGS."),
    "shell": ("[options] IMAGE", "Start an interactive shell in a container of IMAGE."),
    "test": ("[options] IMAGE", "Run IMAGE's test script."),
}


def _add_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("-B", "--bind", action="append", default=[], metavar="SRC[:DST[:ro|rw]]",
      help="bind a host path into the container (repeatable; comma lists)")
    a("--mount", action="append", default=[], metavar="type=bind,src=S,dst=D[,ro]",
      help="bind, in --mount syntax (repeatable)")
    a("-H", "--home", metavar="SRC[:DST]", help="home directory to bind (default: yours)")
    a("--no-home", action="store_true", help="do not bind the home directory")
    a("--no-mount", action="append", default=[], metavar="LIST",
      help="leave out default mounts: proc,sys,dev,home,tmp,cwd,bind-paths or a path")
    a("-c", "--contain", action="store_true",
      help="minimal /dev, empty home and /tmp: share nothing but explicit binds")
    a("-C", "--containall", action="store_true",
      help="--contain, plus --pid, --ipc and --cleanenv")
    a("--pwd", "--cwd", dest="pwd", metavar="DIR", help="working directory in the container")
    a("-e", "--cleanenv", action="store_true", help="do not pass the host environment in")
    a("--env", action="append", default=[], metavar="NAME=VALUE",
      help="set a variable in the container (repeatable; comma lists)")
    a("--env-file", action="append", default=[], metavar="FILE",
      help="set variables from a file of NAME=VALUE lines (repeatable)")
    a("-f", "--fakeroot", action="store_true", help="be root (uid 0) inside the container")
    a("-p", "--pid", action="store_true", help="new PID namespace")
    a("-i", "--ipc", action="store_true", help="new IPC namespace")
    a("--uts", action="store_true", help="new UTS namespace")
    a("--hostname", metavar="NAME", help="host name in the container (implies --uts)")
    a("-n", "--net", action="store_true", help="new network namespace (loopback only)")
    a("--network", metavar="TYPE", help="network type with --net: none (the default)")
    a("-w", "--writable", action="store_true", help="write into a sandbox image")
    a("--writable-tmpfs", action="store_true",
      help="allow writes to the image, kept in memory until the container exits")
    a("--tmpfs-size", type=int, metavar="MIB",
      help="size of the in-memory session (--writable-tmpfs), in MiB")
    a("-o", "--overlay", metavar="DIR", help="keep writes to the image in directory DIR")
    a("--unsquash", action="store_true",
      help="unpack the image into memory instead of mounting it")
    a("-s", "--shell", metavar="PATH", help="shell to start with 'capsid shell'")
    a("-u", "--userns", action="store_true",
      help="use a user namespace (always the case; accepted for compatibility)")
    a("--nv", action="store_true", help="NVIDIA GPU support")
    a("--rocm", action="store_true", help="AMD GPU support")


def _env_list(name: str, sep: str | None = None) -> list[str]:
    """A flag's value from the environment: whole, or split at *sep*."""
    value = config.env(name)
    if not value:
        return []
    return value.split(sep) if sep else [value]


def run(verb: str, argv: list[str]) -> int:
    usage, description = _USAGE[verb]
    p = parser(verb, usage, description)
    _add_flags(p)
    p.add_argument("image")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.nv or args.rocm or config.env_flag("NV") or config.env_flag("ROCM"):
        raise CapsidError("GPU support (--nv/--rocm) is not available in this version of capsid",
                          "run without --nv/--rocm")
    if args.network not in (None, "none"):
        raise CapsidError(f"--network {args.network} is not supported",
                          "use --net --network none for an isolated network")

    from capsid.runtime import binds
    from capsid.runtime.container import ExecOptions, launch

    specs: list[binds.BindSpec] = []
    for text in [*_env_list("BINDPATH"), *_env_list("BIND"), *args.bind]:
        specs.extend(binds.parse_bind(text))
    for text in [*_env_list("MOUNT", "\n"), *args.mount]:
        if text.strip():
            specs.append(binds.parse_mount(text))
    containall = args.containall or config.env_flag("CONTAINALL")
    no_mount = [item.strip() for text in args.no_mount for item in text.split(",")]
    opts = ExecOptions(
        image=args.image, action=verb, argv=tuple(args.args), binds=tuple(specs),
        home=args.home or config.env("HOME"), no_home=args.no_home or config.env_flag("NO_HOME"),
        no_mount=tuple(no_mount), contain=args.contain or containall
        or config.env_flag("CONTAIN"), pwd=args.pwd,
        cleanenv=args.cleanenv or containall or config.env_flag("CLEANENV"),
        env=tuple(args.env), env_files=tuple(args.env_file),
        fakeroot=args.fakeroot or config.env_flag("FAKEROOT"),
        pid=args.pid or containall or config.env_flag("PID"), ipc=args.ipc or containall,
        uts=args.uts, hostname=args.hostname, net=args.net, writable=args.writable,
        writable_tmpfs=args.writable_tmpfs or config.env_flag("WRITABLE_TMPFS"),
        overlay=args.overlay or config.env("OVERLAY"), tmpfs_size_mib=args.tmpfs_size,
        unsquash=args.unsquash or config.env_flag("UNSQUASH"), shell=args.shell,
    )
    launch(opts)
    return 255  # not reached: launch() replaces this process
