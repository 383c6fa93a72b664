"""``capsid exec|run|shell|test``: Apptainer's action commands and their flags.

This is the hot path (every MPI rank starts a container), so the flags are parsed
by a small table-driven parser rather than argparse, which with its imports costs
more than the rest of capsid's start-up. Flags follow Apptainer's (pflag) rules:
``--flag value``, ``--flag=value``, ``-B value``, ``-Bvalue``, grouped short booleans
(``-ec``); options end at the image, everything after it belongs to the command.
"""

from __future__ import annotations

import os
import sys

from capsid import config
from capsid.errors import CapsidError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.runtime.options import Options

_USAGE = {
    "exec": ("[options] IMAGE COMMAND [ARGS...]", "Run COMMAND inside a container of IMAGE."),
    "run": ("[options] IMAGE [ARGS...]",
            "Run IMAGE's runscript (for images from OCI: ENTRYPOINT and CMD) with ARGS."),
    "shell": ("[options] IMAGE", "Start an interactive shell in a container of IMAGE."),
    "test": ("[options] IMAGE", "Run IMAGE's test script."),
}

# (long name, short name, value name or "" for a switch, repeatable, help)
FLAGS: tuple[tuple[str, str, str, bool, str], ...] = (
    ("bind", "B", "SRC[:DST[:ro|rw]]", True,
     "bind a host path into the container (repeatable; comma lists)"),
    ("mount", "", "type=bind,src=S,dst=D[,ro]", True, "bind, in --mount syntax (repeatable)"),
    ("home", "H", "SRC[:DST]", False, "home directory to bind (default: yours)"),
    ("no-home", "", "", False, "do not bind the home directory"),
    ("no-mount", "", "LIST", True,
     "leave out default mounts: proc,sys,dev,home,tmp,cwd,bind-paths"),
    ("contain", "c", "", False, "minimal /dev, empty home and /tmp: share only explicit binds"),
    ("containall", "C", "", False, "--contain, plus --pid, --ipc and --cleanenv"),
    ("compat", "", "", False,
     "as Docker runs images: --containall, --no-umask, --no-eval and --writable-tmpfs"),
    ("workdir", "W", "DIR", False,
     "with --contain: keep /tmp, /var/tmp and the home directory in DIR, not in memory"),
    ("scratch", "S", "DIR", True,
     "an empty writable directory at DIR in the container (in memory, or under --workdir)"),
    ("pwd", "", "DIR", False, "working directory in the container (also --cwd)"),
    ("cleanenv", "e", "", False, "do not pass the host environment in"),
    ("no-env", "", "NAME[,NAME]", True, "do not pass these host variables in (repeatable)"),
    ("env", "", "NAME=VALUE", True, "set a variable in the container (repeatable; comma lists)"),
    ("env-file", "", "FILE", True, "set variables from a file of NAME=VALUE lines (repeatable)"),
    ("no-eval", "", "", False,
     "take --env, --env-file and APPTAINERENV_ values as they are, not evaluated in the "
     "container ('$PATH:/x' stays so); arguments, CMD and ENTRYPOINT never are"),
    ("fakeroot", "f", "", False, "be root (uid 0) inside the container"),
    ("pid", "p", "", False, "new PID namespace"),
    ("no-pid", "", "", False, "no PID namespace of its own, even with --containall"),
    ("ipc", "i", "", False, "new IPC namespace"),
    ("uts", "", "", False, "new UTS namespace"),
    ("hostname", "", "NAME", False, "host name in the container (implies --uts)"),
    ("net", "n", "", False, "new network namespace (loopback only)"),
    ("network", "", "TYPE", False, "network type with --net: none (the default)"),
    ("dns", "", "IP[,IP]", False, "name servers for the container's /etc/resolv.conf"),
    ("no-umask", "", "", False, "start with umask 0022 instead of yours"),
    ("writable", "w", "", False, "write into a sandbox image"),
    ("writable-tmpfs", "", "", False,
     "allow writes to the image, kept in memory until the container exits"),
    ("tmpfs-size", "", "MIB", False, "size of the in-memory session (--writable-tmpfs), in MiB"),
    ("overlay", "o", "DIR", False, "keep writes to the image in directory DIR"),
    ("unsquash", "", "", False, "unpack the image into memory instead of mounting it"),
    ("shell", "s", "PATH", False, "shell to start with 'capsid shell'"),
    ("app", "", "NAME", False,
     "a SCIF app of the image: its environment, and its runscript (run) or test (test)"),
    ("userns", "u", "", False, "use a user namespace (always the case; for compatibility)"),
    ("ignore-subuid", "", "", False,
     "--fakeroot maps only you, even where /etc/subuid grants you ids"),
    ("ignore-fakeroot-command", "", "", False,
     "--fakeroot without subordinate ids: let chown, set*id and mknod fail, not feign them"),
    ("mpi", "", "host|none", False,
     "host: bind the host's MPI in, for an image without one (checked first)"),
    ("sharens", "", "", False,
     "share one container with the other ranks of this job on this node (the default "
     "for ranks of mpirun, srun and Hydra)"),
    ("no-sharens", "", "", False, "give this rank a container of its own"),
    ("nv", "", "", False, "bind the host's NVIDIA driver, tools and GPUs in"),
    ("nvccli", "", "", False,
     "set the NVIDIA GPUs up with nvidia-container-cli (implies --writable-tmpfs)"),
    ("rocm", "", "", False, "bind the host's AMD ROCm driver, tools and GPUs in"),
    ("no-nv", "", "", False, "no NVIDIA GPUs, even where the site always binds them"),
    ("no-rocm", "", "", False, "no AMD GPUs, even where the site always binds them"),
    ("device", "", "VENDOR/CLASS=NAME", True,
     "a CDI device, e.g. nvidia.com/gpu=0 or =all (repeatable; comma lists)"),
    ("cdi-dirs", "", "DIR[,DIR]", False,
     "directories of CDI specs (default: /etc/cdi,/var/run/cdi)"),
    ("no-https", "", "", False, "plain HTTP to the registry of a docker:// image"),
    ("pid-file", "", "FILE", False, "instance start|run: write the instance's process id "
     "to FILE"),
    ("help", "h", "", False, "show this help and exit"),
)
_ALIASES = {"cwd": "pwd", "nohttps": "no-https"}
_BY_LONG = {f[0]: f for f in FLAGS}
_BY_SHORT = {f[1]: f for f in FLAGS if f[1]}

Parsed = dict[str, "str | bool | list[str]"]


def _compat(verb: str, name: str) -> tuple[str, str, str, bool, str] | None:
    """Apptainer's flag *name*, which capsid takes without acting on it (stored under a
    name no one reads), or refuses here with one line (see :mod:`capsid.cli.compat`)."""
    from capsid.cli import compat

    row = compat.accepted(verb, name)
    return None if row is None else (f"compat:{row[0]}", row[1], row[2], row[3], row[5])


def _store(values: Parsed, flag: tuple[str, str, str, bool, str], value: str | None) -> None:
    name, _, metavar, repeatable, _ = flag
    if not metavar:
        values[name] = True
    elif repeatable:
        existing = values.setdefault(name, [])
        assert isinstance(existing, list)
        existing.append(value or "")
    else:
        values[name] = value or ""


def parse(verb: str, argv: list[str]) -> tuple[Parsed, str | None, list[str]]:
    """(flag values, image, command arguments) from *argv*."""
    values: Parsed = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            name, eq, inline = arg[2:].partition("=")
            flag = _BY_LONG.get(_ALIASES.get(name, name))
            if flag is None:  # one of Apptainer's that capsid accepts or refuses?
                flag = _compat(verb, name)
            if flag is None:
                raise UsageError(f"unknown flag --{name}", f"see 'capsid {verb} --help'")
            if flag[2] and not eq:
                i += 1
                if i == len(argv):
                    raise UsageError(f"--{name} needs a value", f"see 'capsid {verb} --help'")
                inline = argv[i]
            elif not flag[2] and eq:
                raise UsageError(f"--{name} takes no value", f"see 'capsid {verb} --help'")
            _store(values, flag, inline)
        else:
            letters = arg[1:]
            while letters:
                flag = _BY_SHORT.get(letters[0])
                if flag is None:
                    raise UsageError(f"unknown flag -{letters[0]}", f"see 'capsid {verb} --help'")
                letters = letters[1:]
                if not flag[2]:
                    _store(values, flag, None)
                    continue
                if not letters:
                    i += 1
                    if i == len(argv):
                        raise UsageError(f"-{flag[1]} needs a value",
                                         f"see 'capsid {verb} --help'")
                    letters = argv[i]
                _store(values, flag, letters.removeprefix("="))
                letters = ""
        i += 1
    image = argv[i] if i < len(argv) else None
    return values, image, argv[i + 1:]


def help_text(verb: str) -> str:
    from capsid.cli.main import PROG

    usage, description = _USAGE[verb]
    lines = [f"Usage: {PROG[0]} {verb} {usage}", "", description, "", "Options:"]
    for name, short, metavar, _, text in FLAGS:
        left = (f"-{short}, " if short else "    ") + f"--{name}" + (f" {metavar}" if metavar
                                                                     else "")
        lines.append(f"  {left:<40} {text}")
    lines += ["", "Variables CAPSID_X, APPTAINER_X and SINGULARITY_X stand in for flags "
              "(CAPSID_BIND, APPTAINER_CONTAIN, ...);",
              "APPTAINERENV_NAME=VALUE sets NAME in the container."]
    return "\n".join(lines) + "\n"


def _list(values: Parsed, name: str) -> list[str]:
    value = values.get(name, [])
    return value if isinstance(value, list) else []


def _text(values: Parsed, name: str) -> str | None:
    value = values.get(name)
    return value if isinstance(value, str) else None


def _flag(values: Parsed, name: str, env_name: str | None = None) -> bool:
    return values.get(name) is True or (env_name is not None and config.env_flag(env_name))


def run(verb: str, argv: list[str]) -> int:
    values, image, args = parse(verb, argv)
    if values.get("help"):
        sys.stdout.write(help_text(verb))
        return 0
    if image is None:
        raise UsageError("no image given", f"usage: capsid {verb} {_USAGE[verb][0]}")
    from capsid.runtime import api

    api.exec_container(image, args, options(values), verb)  # replaces this process
    return 255


def options(values: Parsed) -> Options:
    """The runtime's options from parsed action flags (and their variables)."""
    if _text(values, "network") not in (None, "none"):
        raise CapsidError(f"--network {_text(values, 'network')} is not supported",
                          "use --net --network none for an isolated network")
    hostname = _given(values, "hostname", "HOSTNAME")
    if hostname is not None and not 0 < len(hostname.encode()) <= 64:
        raise UsageError(f"--hostname must have 1 to 64 characters, not {len(hostname)}",
                         "give a host name of 1 to 64 characters")
    mpi = _text(values, "mpi") or config.env("MPI")
    if mpi is not None and mpi not in ("host", "none"):
        raise UsageError(f"--mpi {mpi!r} is not host or none",
                         "--mpi host binds the host's MPI into the container")
    size = _text(values, "tmpfs-size")
    if size is not None and not size.isdigit():
        raise UsageError(f"--tmpfs-size {size!r} is not a number of MiB",
                         "give a whole number, e.g. --tmpfs-size 2048")

    from capsid.runtime import binds
    from capsid.runtime.options import Options

    specs: list[binds.BindSpec] = []
    for name in ("BINDPATH", "BIND"):
        if config.env(name):
            specs.extend(binds.parse_bind(config.env(name) or ""))
    for text in _list(values, "bind"):
        specs.extend(binds.parse_bind(text))
    for text in [*(config.env("MOUNT") or "").split("\n"), *_list(values, "mount")]:
        if text.strip():
            specs.append(binds.parse_mount(text))
    compat = _flag(values, "compat", "COMPAT")
    containall = compat or _flag(values, "containall", "CONTAINALL")
    dns = _items([_text(values, "dns") or config.env("DNS") or ""])
    workdir = _text(values, "workdir") or config.env("WORKDIR")
    if workdir is not None and not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir}: no such directory", "create it first")
    no_mount = _items([*_list(values, "no-mount"), config.env("NO_MOUNT") or ""])
    return Options(
        binds=specs, home=_text(values, "home") or config.env("HOME"),
        no_home=_flag(values, "no-home", "NO_HOME"), no_mount=no_mount,
        contain=containall or _flag(values, "contain", "CONTAIN"),
        pwd=_text(values, "pwd") or _env("PWD", "TARGET_PWD", "CWD", "TARGET_CWD"),
        cleanenv=containall or _flag(values, "cleanenv", "CLEANENV"),
        env=_list(values, "env"),
        no_env=_items([*_list(values, "no-env"), config.env("NOENV") or ""]),
        env_files=_list(values, "env-file") or _items([config.env("ENV_FILE") or ""]),
        fakeroot=_flag(values, "fakeroot", "FAKEROOT"),
        pid=(containall or _flag(values, "pid", "PID") or config.env_flag("UNSHARE_PID"))
        and not _flag(values, "no-pid", "NO_PID"),
        ipc=containall or _flag(values, "ipc", "IPC") or config.env_flag("UNSHARE_IPC"),
        uts=_flag(values, "uts", "UTS") or config.env_flag("UNSHARE_UTS"), hostname=hostname,
        net=_flag(values, "net", "NET") or config.env_flag("UNSHARE_NET"),
        writable=_flag(values, "writable", "WRITABLE"),
        writable_tmpfs=compat or _flag(values, "writable-tmpfs", "WRITABLE_TMPFS"),
        overlay=_text(values, "overlay") or _env("OVERLAY", "OVERLAYIMAGE"),
        tmpfs_size_mib=int(size) if size else None,
        unsquash=_flag(values, "unsquash", "UNSQUASH"),
        shell=_given(values, "shell", "SHELL"),
        nv=_flag(values, "nv", "NV"), nvccli=_flag(values, "nvccli", "NVCCLI"),
        rocm=_flag(values, "rocm", "ROCM"),
        devices=_items([*_list(values, "device"), config.env("DEVICE") or ""]),
        cdi_dirs=_items([_text(values, "cdi-dirs") or config.env("CDI_DIRS") or ""]),
        sharens=False if _flag(values, "no-sharens", "NO_SHARENS") else
        True if _flag(values, "sharens", "SHARENS") else None, mpi=mpi,
        no_umask=compat or _flag(values, "no-umask", "NO_UMASK"), dns=dns, workdir=workdir,
        scratch=_items([*_list(values, "scratch"), _env("SCRATCH", "SCRATCHDIR") or ""]),
        ignore_subuid=_flag(values, "ignore-subuid", "IGNORE_SUBUID"),
        ignore_fakeroot_command=_flag(values, "ignore-fakeroot-command",
                                      "IGNORE_FAKEROOT_COMMAND"),
        no_nv=_flag(values, "no-nv", "NO_NV") or config.env_flag("NV_OFF"),
        no_rocm=_flag(values, "no-rocm", "NO_ROCM") or config.env_flag("ROCM_OFF"),
        no_eval=compat or _flag(values, "no-eval", "NO_EVAL"),
        no_https=_flag(values, "no-https"), app=_app(_given(values, "app", "APP")),
    )


def _given(values: Parsed, flag: str, variable: str) -> str | None:
    """The flag's value as given (even empty), else its variable's."""
    text = _text(values, flag)
    return text if text is not None else config.env(variable)


def _env(*names: str) -> str | None:
    """The first of Apptainer's variables for one flag (APPTAINER_PWD, _TARGET_PWD...)."""
    return next((v for v in map(config.env, names) if v), None)


def _app(name: str | None) -> str | None:
    """``--app NAME``: a directory name under /scif/apps."""
    if name is not None and (not name or "/" in name or name in (".", "..")):
        raise UsageError(f"--app {name!r} is not an app name",
                         "see 'capsid inspect --list-apps IMAGE' for the image's apps")
    return name


def _items(texts: list[str]) -> list[str]:
    """The items of comma lists."""
    return [item.strip() for text in texts for item in text.split(",") if item.strip()]
