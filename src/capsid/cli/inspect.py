"""``capsid inspect``: an image's labels, scripts, def file and environment."""

from __future__ import annotations

import json
import sys

from capsid.cli.parser import parser
from capsid.errors import UsageError
from capsid.image import inspect, meta
from capsid.image.locate import locate

_SECTIONS = ("labels", "deffile", "runscript", "startscript", "test", "environment", "helpfile")


def _text(info: meta.Metadata, section: str) -> str:
    if section == "labels":
        return "".join(f"{k}: {v}\n" for k, v in sorted(info.labels.items()))
    if section == "environment":
        return "\n".join(f"=== {path} ===\n{body.rstrip(chr(10))}\n"
                         for path, body in info.environment.items())
    value = str(getattr(info, section) or "")
    if not value:
        return ""
    return value if value.endswith("\n") else value + "\n"


def run(verb: str, argv: list[str]) -> int:
    if verb == "run-help":  # Apptainer's run-help IMAGE: the %help text
        argv = ["--helpfile", *argv]
        p = parser("run-help", "[--app NAME] IMAGE",
                   "Show an image's help text (its %help section, or an app's).")
    else:
        p = parser("inspect", "[options] IMAGE",
                   "Show the metadata of a SIF file, squashfs image or sandbox. "
                   "With no option, the labels.")
    p.add_argument("-l", "--labels", action="store_true", help="show the labels (default)")
    p.add_argument("-d", "--deffile", action="store_true", help="show the definition file")
    p.add_argument("-r", "--runscript", action="store_true", help="show the runscript")
    p.add_argument("-s", "--startscript", action="store_true", help="show the startscript")
    p.add_argument("-t", "--test", action="store_true", help="show the test script")
    p.add_argument("-e", "--environment", action="store_true",
                   help="show the environment scripts")
    p.add_argument("-H", "--helpfile", action="store_true", help="show the runscript help")
    p.add_argument("-j", "--json", action="store_true", help="print JSON, as Apptainer does")
    p.add_argument("--all", action="store_true", help="show everything, apps included, as JSON")
    p.add_argument("--list-apps", action="store_true", help="list the image's SCIF apps")
    p.add_argument("--app", metavar="NAME", help="show the metadata of SCIF app NAME")
    p.add_argument("image")
    from capsid.cli import compat

    compat.add_to(p, "inspect")
    args = p.parse_args(argv)
    chosen = [s for s in _SECTIONS if args.all or getattr(args, s)] or ["labels"]
    image = locate(args.image)
    if args.list_apps:
        sys.stdout.write("".join(f"{name}\n" for name in inspect.apps(image)))
        return 0
    if args.app is not None:
        found = inspect.apps(image)
        if args.app not in found:
            raise UsageError(f"{args.image} has no SCIF app called {args.app!r}",
                             f"its apps: {', '.join(found) or 'none'}")
        info = found[args.app]
    else:
        info = inspect.metadata(image)
    if args.json or args.all:  # as Apptainer's, --all implies --json
        attrs = info.attributes()
        picked = {k: attrs.get(k, {} if k in ("labels", "environment") else "") for k in chosen}
        found = inspect.apps(image) if args.all and args.app is None else {}
        if found:
            picked["apps"] = {name: app.attributes() for name, app in found.items()}
        json.dump({"data": {"attributes": picked}, "type": "container"}, sys.stdout, indent=4)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write("\n".join(filter(None, (_text(info, s) for s in chosen))))
    return 0
