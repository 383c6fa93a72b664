"""SCIF apps of a definition file (``%apprun NAME``, ``%appinstall NAME``, ...), laid
out as Apptainer lays them out.

Each app gets ``/scif/apps/NAME/{bin,lib,scif/env}`` and ``/scif/data/NAME/{input,output}``;
its sections become ``scif/runscript``, ``scif/test``, ``scif/runscript.help``,
``scif/labels.json`` and ``scif/env/90-environment.sh`` beside ``scif/env/01-base.sh``;
``/.singularity.d/env/94-appsbase.sh`` exports every app's ``SCIF_APP*_NAME`` paths.
``%appfiles`` are copied into the app's directory and ``%appinstall`` runs after
``%post``, in the app's directory, as Apptainer appends it there. At run time
``--app NAME`` sets ``SINGULARITY_APPNAME``, which the image's ``95-apps.sh`` reads.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from capsid.build.recipe import Copy, Run, Where
from capsid.errors import UsageError

SECTIONS = ("appinstall", "applabels", "appfiles", "appenv", "apptest", "apphelp",
            "apprun", "appstart")
ROOT = "/scif/apps"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


@dataclass
class App:
    """One app's sections, as written (repeated sections concatenated)."""

    name: str
    where: Where
    install: str = ""
    files: str = ""
    env: str = ""
    test: str = ""
    help: str = ""
    run: str = ""
    labels: str = ""
    start: str = ""


def app_name(args: str, section: str, where: Where) -> str:
    """The NAME of ``%SECTION NAME``: a directory name under /scif/apps."""
    words = args.split()
    if not words or not _NAME.fullmatch(words[0]):
        raise UsageError(f"{where}: %{section} needs an app name (letters, digits, '_', "
                         f"'.', '-'), got {args!r}", f"write %{section} NAME")
    return words[0]


def add(apps: dict[str, App], section: str, args: str, body: str, where: Where) -> None:
    """Record section *section* of the app named in *args*."""
    name = app_name(args, section, where)
    app = apps.setdefault(name, App(name, where))
    field = section.removeprefix("app")
    setattr(app, field, getattr(app, field) + body)


def _env_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def files(apps: list[App]) -> dict[str, tuple[str, int]]:
    """Every file the apps' sections make: path → (content, mode)."""
    made: dict[str, tuple[str, int]] = {}
    globals_ = ""
    for app in apps:
        meta = f"{ROOT}/{app.name}/scif"
        made[f"{meta}/env/01-base.sh"] = (
            f"#!/bin/sh\n\nSCIF_APPNAME={app.name}\nSCIF_APPROOT=\"{ROOT}/{app.name}\"\n"
            f"SCIF_APPMETA=\"{meta}\"\nSCIF_DATA=\"/scif/data\"\n"
            f"SCIF_APPDATA=\"/scif/data/{app.name}\"\n"
            f"SCIF_APPINPUT=\"/scif/data/{app.name}/input\"\n"
            f"SCIF_APPOUTPUT=\"/scif/data/{app.name}/output\"\n"
            "export SCIF_APPDATA SCIF_APPNAME SCIF_APPROOT SCIF_APPMETA SCIF_APPINPUT "
            "SCIF_APPOUTPUT SCIF_DATA\n", 0o755)
        if app.env:
            made[f"{meta}/env/90-environment.sh"] = (app.env, 0o755)
        if app.run:
            made[f"{meta}/runscript"] = (f"#!/bin/sh\n\n{app.run}\n", 0o755)
        if app.start:
            made[f"{meta}/startscript"] = (f"#!/bin/sh\n\n{app.start}\n", 0o755)
        if app.test:
            made[f"{meta}/test"] = (f"#!/bin/sh\n\n{app.test}\n", 0o755)
        if app.help:
            made[f"{meta}/runscript.help"] = (app.help, 0o644)
        labels = {"SCIF_APP_NAME": app.name}
        for line in app.labels.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                labels[key.strip()] = value.strip()
        made[f"{meta}/labels.json"] = (json.dumps(labels, indent="\t", sort_keys=True), 0o644)
        env = _env_name(app.name)
        globals_ += (f"## App Global Exports For: {env}\n\n"
                     + "".join(f"SCIF_{kind}_{env}={path}\n" for kind, path in (
                         ("APPDATA", f"/scif/data/{app.name}"), ("APPMETA", meta),
                         ("APPROOT", f"{ROOT}/{app.name}"), ("APPBIN", f"{ROOT}/{app.name}/bin"),
                         ("APPLIB", f"{ROOT}/{app.name}/lib")))
                     + f"\nexport SCIF_APPDATA_{env} SCIF_APPMETA_{env} SCIF_APPROOT_{env} "
                       f"SCIF_APPBIN_{env} SCIF_APPLIB_{env}\n")
        for kind, rel, present in (("APPENV", "env/90-environment.sh", app.env),
                                   ("APPLABELS", "labels.json", True),
                                   ("APPRUN", "runscript", app.run)):
            if present:
                globals_ += f'export SCIF_{kind}_{env}="{meta}/{rel}"\n'
    made["/.singularity.d/env/94-appsbase.sh"] = (globals_, 0o755)
    return made


def layout_step(apps: list[App]) -> Run:
    """A step that makes the apps' directories and files (it needs the image's /bin/sh,
    as every step of a definition file does)."""
    lines = ["set -e"]
    for app in apps:
        dirs = [f"{ROOT}/{app.name}/{d}" for d in ("bin", "lib", "scif/env")] + \
            [f"/scif/data/{app.name}/{d}" for d in ("input", "output")]
        lines.append("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
    for path, (content, mode) in files(apps).items():
        end = "CAPSID_SCIF_END"
        while end in content:
            end += "_"
        body = content if content.endswith("\n") or not content else content + "\n"
        lines += [f"cat > {shlex.quote(path)} <<'{end}'", body + end if body else end,
                  f"chmod {mode:o} {shlex.quote(path)}"]
    script = "\n".join(lines) + "\n"
    names = ", ".join(app.name for app in apps)
    return Run(("/bin/sh", Run.SCRIPT), f"SCIF apps: {names}\n{script}", apps[0].where,
               script=script)


def copies(apps: list[App]) -> list[Copy]:
    """``%appfiles NAME``: ``SRC [DST]`` lines, DST inside the app's directory."""
    found = []
    for app in apps:
        for offset, line in enumerate(app.files.splitlines()):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            src, _, dst = line.partition(" ")
            dst = dst.strip() or src
            where = Where(app.where.file, app.where.line + 1 + offset)
            if ".." in dst.split("/"):
                raise UsageError(f"{where}: %appfiles destination {dst!r} leaves the app",
                                 f"give a path inside {ROOT}/{app.name}")
            found.append(Copy((src,), f"{ROOT}/{app.name}/{dst.lstrip('/')}", where,
                              follow_links=True, dockerish=False))
    return found


def install_script(apps: list[App]) -> str:
    """What Apptainer appends to %post: each app's %appinstall, run in its directory."""
    return "".join(f"\ncd /\n. {ROOT}/{app.name}/scif/env/01-base.sh\n\ncd {ROOT}/{app.name}\n"
                   f"{app.install}\n\ncd /\n" for app in apps if app.install)
