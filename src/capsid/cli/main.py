"""``capsid`` entry point: global options, then hand over to the verb's module.

Verb modules are imported only when chosen, so ``capsid --version`` and the
``exec`` path load nothing they do not use.
"""

from __future__ import annotations

import sys

from capsid import __version__

#: verb → (module under capsid.cli, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("build", "Build a SIF image or a sandbox from a sandbox or another image"),
    "exec": ("actions", "Run a command inside a container"),
    "run": ("actions", "Run the image's runscript (or ENTRYPOINT/CMD)"),
    "shell": ("actions", "Start an interactive shell inside a container"),
    "test": ("actions", "Run the image's test script"),
    "pull": ("pull", "Download an image (docker://, oras://, archives) as a SIF file"),
    "push": ("pull", "Upload a SIF to a registry (oras:// or docker://)"),
    "registry": ("registry", "Log in to or out of a registry"),
    "cache": ("cache", "List or clean the cache of blobs and converted images"),
    "inspect": ("inspect", "Show an image's labels, scripts, def file and environment"),
    "sif": ("sif", "Look inside SIF files: list, info, header, dump"),
    "version": ("", "Show the version"),
    "help": ("", "Show help for a command"),
}

GLOBAL_HELP = """\
Usage: capsid [global options] <command> [command options] ...

Containers for HPC: build, convert and run Apptainer-compatible images without root.

Commands:
{commands}

Global options:
  -d, --debug     print debugging information (and tracebacks)
  -v, --verbose   print more information about what capsid does
  -q, --quiet     print only errors
  -s, --silent    print nothing but the command's own output
      --version   show the version and exit
  -h, --help      show this help and exit

Run 'capsid help <command>' or 'capsid <command> --help' for a command's options.
"""


def _help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return GLOBAL_HELP.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    level_name, debug = "normal", False
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-d", "--debug"):
            level_name, debug = "debug", True
        elif opt in ("-v", "--verbose"):
            level_name = "verbose"
        elif opt in ("-q", "--quiet", "-s", "--silent"):
            level_name = "quiet"
        elif opt == "--version":
            print(f"capsid version {__version__}")
            return 0
        elif opt in ("-h", "--help"):
            print(_help_text(), end="")
            return 0
        else:
            return _usage_error(f"unknown global option {opt}", "see 'capsid --help'")
    if not args:
        print(_help_text(), end="", file=sys.stderr)
        return 255
    verb, rest = args[0], args[1:]
    if verb == "version":
        print(f"capsid version {__version__}")
        return 0
    if verb == "help":
        if not rest:
            print(_help_text(), end="")
            return 0
        verb, rest = rest[0], ["--help"]
    if verb not in COMMANDS or not COMMANDS[verb][0]:
        return _usage_error(f"unknown command {verb!r}", "see 'capsid --help' for the commands")
    return _dispatch(verb, rest, level_name, debug)


def _usage_error(message: str, hint: str) -> int:
    print(f"capsid: error: {message}; {hint}", file=sys.stderr)
    return 255


def _dispatch(verb: str, rest: list[str], level_name: str, debug: bool) -> int:
    from capsid import log
    from capsid.errors import CapsidError

    if debug:
        import traceback  # now: the container's root may hide the standard library later

    log.configure({"debug": log.DEBUG, "verbose": log.VERBOSE, "quiet": log.QUIET}
                  .get(level_name, log.NORMAL))
    name = f"capsid.cli.{COMMANDS[verb][0]}"
    __import__(name)  # not importlib: importing it costs half a millisecond
    module = sys.modules[name]
    try:
        return int(module.run(verb, rest))
    except CapsidError as err:
        if debug:
            traceback.print_exc()
        print(f"capsid: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("capsid: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as err:
        if debug:
            raise
        print(f"capsid: error: internal error ({type(err).__name__}: {err}); this is a bug in "
              "capsid: please report it with the output of the same command run with --debug",
              file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main())
