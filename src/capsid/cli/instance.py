"""``capsid instance start|list|stop``: containers that run in the background."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from capsid.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.runtime import instances

USAGE = """\
Usage: capsid instance start [exec options] IMAGE NAME [ARGS...]
       capsid instance run [exec options] IMAGE NAME [ARGS...]   (the runscript)
       capsid instance list [--json|--logs] [NAME|PATTERN...]
       capsid instance stop [--signal SIG] [--timeout S] [--force] NAME|PATTERN...|--all

Instances run an image's %startscript (or nothing) in the background, in their own
namespaces; 'capsid exec|run|shell instance://NAME ...' runs commands in them.
"""


def run(verb: str, argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 255
    action, rest = argv[0], argv[1:]
    if action in ("list", "stop") and ("-h" in rest or "--help" in rest):
        sys.stdout.write(USAGE)
        return 0
    if action in ("start", "run"):
        return _start(rest, "startscript" if action == "start" else "runscript")
    if action == "list":
        return _list(rest)
    if action == "stop":
        return _stop(rest)
    raise UsageError(f"unknown instance command {action!r}", "use start, run, list or stop")


def _start(argv: list[str], script: str) -> int:
    from capsid.cli import actions
    from capsid.runtime import api, instances

    verb = f"instance {'start' if script == 'startscript' else 'run'}"
    values, image, args = actions.parse(verb, argv)
    pid_file = values.get("pid-file")
    if values.get("help"):
        sys.stdout.write(USAGE)
        return 0
    if image is None or not args:
        raise UsageError("instance start needs IMAGE and NAME",
                         "capsid instance start [options] IMAGE NAME [ARGS...]")
    name, rest = args[0], args[1:]
    # as Apptainer's: an instance has a PID namespace of its own
    options = actions.options(values).replace(pid=True)
    started = instances.start(api.resolve(image, options), name, rest, options, script)
    if isinstance(pid_file, str) and pid_file:
        from capsid.image import output

        output.write_bytes(Path(pid_file), f"{started.pid}\n".encode())
    sys.stderr.write(f"instance {started.name} started (pid {started.pid})\n")
    return 0



def _list(argv: list[str]) -> int:
    from fnmatch import fnmatchcase

    from capsid.runtime import instances

    as_json = "--json" in argv or "-j" in argv
    logs = "--logs" in argv or "-l" in argv
    for arg in argv:
        if arg.startswith("-") and arg not in ("--json", "-j", "--logs", "-l"):
            _compat("instance list", arg)
    patterns = [a for a in argv if not a.startswith("-")]  # names or globs ('test*')
    found = [i for i in instances.listed()
             if not patterns or any(fnmatchcase(i.name, p) for p in patterns)]
    if as_json:
        records = [{"instance": i.name, "pid": i.pid, "img": i.image, "ip": "",
                    "logErrPath": i.log_err, "logOutPath": i.log_out} for i in found]
        sys.stdout.write(json.dumps({"instances": records}, indent=4) + "\n")
        return 0
    if logs:
        sys.stdout.write(f"{'INSTANCE NAME':<16} {'PID':<8} LOGS\n")
        for i in found:
            sys.stdout.write(f"{i.name:<16} {i.pid:<8} {i.log_err}\n{'':<25} {i.log_out}\n")
        return 0
    sys.stdout.write(f"{'INSTANCE NAME':<16} {'PID':<8} {'IP':<8} IMAGE\n")
    for i in found:
        sys.stdout.write(f"{i.name:<16} {i.pid:<8} {'':<8} {i.image}\n")
    return 0


def _stop(argv: list[str]) -> int:
    from capsid.runtime import instances

    signum: int = signal.SIGTERM
    timeout, everything, names = 10.0, False, []
    args = iter(argv)
    for arg in args:
        if arg in ("-a", "--all"):
            everything = True
        elif arg in ("-F", "--force"):
            signum = signal.SIGKILL
        elif arg in ("-s", "--signal") or arg.startswith("--signal="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            signum = _signal(value)
        elif arg in ("-t", "--timeout") or arg.startswith("--timeout="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not value.isdigit():
                raise UsageError(f"--timeout {value!r} is not a number of seconds",
                                 "e.g. --timeout 10")
            timeout = float(value)
        elif arg.startswith("-"):
            _compat("instance stop", arg)
        else:
            names.append(arg)
    if everything == bool(names):
        raise UsageError("instance stop needs NAME or --all", "see 'capsid instance list'")
    targets = instances.listed() if everything else _matching(names)
    failed = 0
    for target in targets:
        try:
            instances.stop(target, signum, timeout)
        except OSError as err:  # one that cannot be stopped does not keep the others running
            sys.stderr.write(f"capsid: error: cannot stop instance {target.name}: "
                             f"{err.strerror}\n")
            failed += 1
            continue
        sys.stderr.write(f"instance {target.name} stopped\n")
    return 255 if failed else 0


def _matching(names: list[str]) -> list[instances.Instance]:
    """The instances *names* give: names, or patterns as Apptainer's ('mysql*')."""
    from fnmatch import fnmatchcase

    from capsid.runtime import instances

    found: list[instances.Instance] = []
    for name in names:
        if not any(c in name for c in "*?["):
            found.append(instances.find(name))
            continue
        matched = [i for i in instances.listed() if fnmatchcase(i.name, name)]
        if not matched:
            raise UsageError(f"no instance matches {name!r}", "see 'capsid instance list'")
        found += [i for i in matched if i not in found]
    return found


def _compat(verb: str, arg: str) -> None:
    """Apptainer's flag *arg* of *verb*: accepted (returns) or refused (one line)."""
    from capsid.cli import compat

    if compat.accepted(verb, arg.lstrip("-").partition("=")[0]) is None:
        raise UsageError(f"unknown flag {arg}", f"see 'capsid {verb} --help'")


def _signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        return int(name)
    name = name if name.startswith("SIG") else f"SIG{name}"
    number = getattr(signal, name, None)
    if not isinstance(number, signal.Signals):
        raise UsageError(f"--signal {text!r} is not a signal", "e.g. --signal SIGTERM or 15")
    return int(number)
