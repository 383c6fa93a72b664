"""``capsid`` entry point: global options, then hand over to the verb's module.

Verb modules are imported only when chosen, so ``capsid --version`` and the
``exec`` path load nothing they do not use.
"""

from __future__ import annotations

import gc
import sys

import capsid
from capsid import __version__

#: the Apptainer release whose behaviour capsid follows, for the drop-in names' version
APPTAINER_VERSION = "1.4.5"
#: names capsid also answers to, as a drop-in for Apptainer (bin/apptainer, ...)
DROP_IN = ("apptainer", "singularity", "run-singularity")
#: Apptainer's verbs that capsid does not have (exit 255 with one line, as Apptainer
#: does for a verb it does not know)
UNSUPPORTED = ("capability", "checkpoint", "config", "delete", "oci", "plugin", "remote",
               "search")

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
    "overlay": ("overlay", "Create a persistent overlay image (ext3) for --overlay"),
    "instance": ("instance", "Start, list and stop containers running in the background"),
    "run-help": ("inspect", "Show an image's help text (%help)"),
    "sif": ("sif", "Look inside SIF files: list, info, header, dump"),
    "sign": ("sign", "Add an OpenPGP signature to a SIF image"),
    "verify": ("sign", "Check a SIF image's signatures"),
    "key": ("sign", "Manage OpenPGP keys for signing and verifying"),
    "keyserver": ("sign", "Keyservers (capsid shares keys as files)"),
    "doctor": ("doctor", "Check whether an image will run well on this host (MPI, libc, CPU)"),
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
  -c, --config F  the site configuration file (instead of /etc/capsid/capsid.conf)
      --nocolor   accepted: capsid prints no colours
      --version   show the version and exit
  -h, --help      show this help and exit

Run 'capsid help <command>' or 'capsid <command> --help' for a command's options.
"""


def _help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    text = GLOBAL_HELP.format(commands="\n".join(lines))
    if PROG[0] != "capsid":
        text = text.replace("Usage: capsid", f"Usage: {PROG[0]}").replace(
            "'capsid ", f"'{PROG[0]} ") + f"\n{PROG[0]} is capsid {__version__}, which " \
            f"follows Apptainer {APPTAINER_VERSION}.\n"
    return text


def program() -> str:
    """The name capsid was started as: ``capsid``, or a drop-in name for Apptainer."""
    name = sys.argv[0].rpartition("/")[2] if sys.argv and sys.argv[0] else "capsid"
    return name if name in DROP_IN else "capsid"


def _version(prog: str, bare: bool) -> str:
    """What ``--version`` (or, *bare*, ``version``) prints under *prog*.

    Under the drop-in names, Apptainer's form with its version, capsid's after a ``+``
    (a PEP 440 local version, so parsers such as Snakemake's accept it). Apptainer
    prints its package name there even when run as ``singularity``.
    """
    if prog == "capsid":
        return f"capsid version {__version__}"
    number = f"{APPTAINER_VERSION}+capsid.{__version__}"
    return number if bare else f"apptainer version {number}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    capsid.mark("main")  # the interpreter is up and the CLI imported
    if argv is None:  # the program itself: no cycles to collect while a container starts
        gc.disable()  # (1 ms of a start's imports); _dispatch turns it on for other verbs
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program()
    PROG[0] = prog
    if prog == "run-singularity":  # the interpreter of executable SIFs: run IMAGE ARGS
        if not args or args[0] in ("-h", "--help"):
            print("Usage: run-singularity IMAGE [ARGS...]  (the same as "
                  "'apptainer run IMAGE ARGS')")
            return 0 if args else 255
        return _dispatch("run", args, "normal", False)
    level_name, debug = "normal", False
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-d", "--debug"):
            level_name, debug = "debug", True
        elif opt in ("-v", "--verbose"):
            level_name = "verbose"
        elif opt in ("-q", "--quiet", "-s", "--silent"):
            level_name = "quiet"
        elif opt == "--nocolor":
            pass  # capsid prints no colours
        elif opt in ("-c", "--config") or opt.startswith("--config="):
            import os

            value = opt.partition("=")[2] if "=" in opt else (args.pop(0) if args else "")
            if not value:
                return _usage_error(f"{opt} needs a file", "e.g. -c /etc/capsid/capsid.conf")
            os.environ["CAPSID_CONFIG"] = value
        elif opt == "--version":
            print(_version(prog, False))
            return 0
        elif opt in ("-h", "--help"):
            print(_help_text(), end="")
            return 0
        else:
            return _usage_error(f"unknown global option {opt}", f"see '{prog} --help'")
    if not args:
        print(_help_text(), end="", file=sys.stderr)
        return 255
    verb, rest = args[0], args[1:]
    if (verb == "help" and rest[:1] in (["version"], ["help"])) or \
            (verb in ("version", "help") and rest[:1] in (["-h"], ["--help"])):
        name = rest[0] if rest[0] in ("version", "help") else verb
        print(f"Usage: {prog} {name}{' [COMMAND]' if name == 'help' else ''}\n\n"
              f"{COMMANDS[name][1]}.")
        return 0
    if verb == "version":
        print(_version(prog, True))
        if prog != "capsid" and level_name in ("verbose", "debug"):
            print(f"capsid version {__version__}")
        return 0
    if verb == "help":
        if not rest:
            print(_help_text(), end="")
            return 0
        verb, rest = rest[0], ["--help"]
    if verb in UNSUPPORTED:
        return _usage_error(f"{verb!r} is an Apptainer command that capsid does not support "
                            "yet", f"see '{prog} --help' for the commands it has")
    if verb not in COMMANDS or not COMMANDS[verb][0]:
        return _usage_error(f"unknown command {verb!r}", f"see '{prog} --help' for the "
                            "commands")
    return _dispatch(verb, rest, level_name, debug)


#: the command's name as run, for messages (one element, set by main)
PROG = ["capsid"]


def _named(text: str) -> str:
    """*text* with capsid's commands named as the user ran them (``'apptainer exec``)."""
    return text if PROG[0] == "capsid" else text.replace("'capsid ", f"'{PROG[0]} ")


def _usage_error(message: str, hint: str) -> int:
    print(f"{PROG[0]}: error: {message}; {_named(hint)}", file=sys.stderr)
    return 255


def _dispatch(verb: str, rest: list[str], level_name: str, debug: bool) -> int:
    from capsid import log
    from capsid.errors import CapsidError

    if debug:
        import traceback  # now: the container's root may hide the standard library later

    log.configure({"debug": log.DEBUG, "verbose": log.VERBOSE, "quiet": log.QUIET}
                  .get(level_name, log.NORMAL))
    if COMMANDS[verb][0] != "actions":
        gc.enable()
    name = f"capsid.cli.{COMMANDS[verb][0]}"
    __import__(name)  # not importlib: importing it costs half a millisecond
    module = sys.modules[name]
    try:
        return int(module.run(verb, rest))
    except CapsidError as err:
        if debug:
            traceback.print_exc()
        print(f"{PROG[0]}: error: {_named(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        output = sys.modules.get("capsid.image.output")
        if output is not None:  # what it was writing, even half made
            output.discard_live()
        print(f"{PROG[0]}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as err:
        if debug:
            raise
        print(f"{PROG[0]}: error: internal error ({type(err).__name__}: {err}); this is a bug in "
              "capsid: please report it with the output of the same command run with --debug",
              file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main())
