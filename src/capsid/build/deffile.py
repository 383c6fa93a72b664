"""Apptainer definition file → :class:`~capsid.build.recipe.Recipe`, with Apptainer's rules.

A file is split into stages at each ``Bootstrap:`` line; each has a header of
``Key: value`` lines and ``%section`` blocks (repeated sections are concatenated).
``{{ var }}`` placeholders are replaced before parsing, from ``--build-arg``, then
``--build-arg-file``, then the stage's ``%arguments``; an undefined one is an error,
as in Apptainer. The order of a stage's steps is Apptainer's: bootstrap, ``%files
from`` stages, ``%setup``, ``%files``, ``%post``; ``%environment``, ``%runscript``,
``%startscript``, ``%test``, ``%labels`` and ``%help`` become the image's metadata;
SCIF ``%app*`` sections are laid out by :mod:`capsid.build.scif`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from capsid.build import scif
from capsid.build.recipe import Base, Copy, Metadata, Recipe, Run, Setup, Stage, Where
from capsid.errors import UsageError

SECTIONS = ("help", "setup", "files", "labels", "environment", "pre", "post", "runscript",
            "test", "startscript", "arguments")
_HEADER_KEYS = {"bootstrap", "from", "includecmd", "mirrorurl", "updateurl", "osversion",
                "include", "library", "registry", "namespace", "stage", "product", "user",
                "regcode", "productpgp", "registerurl", "modules", "fingerprints", "confurl",
                "setopt"}
_PLACEHOLDER = re.compile(r"{{\s*(\w+)\s*}}")
_SUPPORTED = {"docker": "docker", "docker-archive": "docker-archive", "oci": "oci",
              "oci-archive": "oci-archive", "localimage": "localimage", "scratch": "scratch",
              "debootstrap": "debootstrap", "busybox": "busybox"}


def _chunks(text: str) -> list[tuple[int, str]]:
    """The stages: (first line number, text), split at each ``Bootstrap:`` line."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(r"(?i)\s*bootstrap\s*:", line)]
    if not starts:
        return [(1, text)]
    starts[0] = 0  # anything before the first Bootstrap belongs to the first stage
    return [(start + 1, "".join(lines[start:end]))
            for start, end in zip(starts, [*starts[1:], len(lines)], strict=True)]


def _substitute(chunk: str, values: Mapping[str, str], path: str, first: int) -> str:
    """``{{ name }}`` replaced on every line that is not a comment; undefined is an error."""
    out = []
    for offset, line in enumerate(chunk.splitlines(keepends=True)):
        stripped = line.lstrip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            out.append(line)
            continue

        def value(match: re.Match[str], line_no: int = first + offset) -> str:
            name = match.group(1)
            if name not in values:
                raise UsageError(f"{path}:{line_no}: build var {name} is not defined through "
                                 "either --build-arg (--build-arg-file) or 'arguments' section",
                                 f"pass --build-arg {name}=VALUE or add it to %arguments")
            return values[name]

        out.append(_PLACEHOLDER.sub(value, line))
    return "".join(out)


def _sections(chunk: str, path: str, first: int
              ) -> tuple[dict[str, str], list[tuple[str, str, str, int]]]:
    """(header, [(section, args, body, line)]) of one stage."""
    header: dict[str, str] = {}
    sections: list[tuple[str, str, str, int]] = []
    lines = chunk.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        number = first + i
        if line.lstrip().startswith("%"):
            break
        text = line.split("#", 1)[0].strip()
        i += 1
        if not text:
            continue
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + lines[i].split("#", 1)[0].strip()
            i += 1
        key, sep, value = text.partition(":")
        key = key.strip().lower()
        if not sep or not (key in _HEADER_KEYS or re.fullmatch(r"otherurl\d+", key)):
            raise UsageError(f"{path}:{number}: invalid header keyword found: {text!r}",
                             "header lines are 'Key: value' with a key Apptainer knows "
                             "(Bootstrap, From, Stage, OSVersion, MirrorURL, Include, ...)")
        header[key] = value.strip()
    while i < len(lines):
        match = re.match(r"\s*%(\S+)\s*(.*)", lines[i])
        if not match:
            i += 1
            continue
        name, args, number = match.group(1).lower(), match.group(2).strip(), first + i
        i += 1
        body = []
        while i < len(lines) and not re.match(r"\s*%[a-zA-Z]", lines[i]):
            body.append(lines[i])
            i += 1
        if name not in SECTIONS and name not in scif.SECTIONS:
            raise UsageError(f"{path}:{number}: invalid section %{name}",
                             f"the sections are {', '.join('%' + s for s in SECTIONS)}")
        sections.append((name, args, "\n".join(body).strip("\n") + "\n", number))
    return header, sections


def _arguments(sections: list[tuple[str, str, str, int]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, _, body, _ in sections:
        if name != "arguments":
            continue
        for line in body.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip().strip("\"'")
    return values


def _files(args: str, body: str, where: Where) -> list[Copy]:
    from_stage = None
    if args:
        words = args.split()
        if len(words) != 2 or words[0] != "from":
            raise UsageError(f"{where}: %files {args} is not '%files from STAGE'",
                             "write %files or %files from STAGE")
        from_stage = words[1]
    copies = []
    for offset, line in enumerate(body.splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = shlex.split(line)
        except ValueError:
            raise UsageError(f"{where.file}:{where.line + 1 + offset}: unbalanced quotes in "
                             f"{line!r}", "quote each path completely") from None
        if len(parts) > 2:
            raise UsageError(f"{where.file}:{where.line + 1 + offset}: {line!r} has more than "
                             "a source and a destination", "quote paths that hold spaces")
        copies.append(Copy((parts[0],), parts[-1], Where(where.file, where.line + 1 + offset),
                           from_stage=from_stage, follow_links=from_stage is None,
                           dockerish=False))
    return copies


def _script_argv(args: str) -> tuple[str, ...]:
    """How a build script runs: ``/bin/sh -ex``, or ``%post -c INTERPRETER``."""
    if args.startswith("-c"):
        interpreter = shlex.split(args[2:].strip())
        if not interpreter:
            raise UsageError("%post -c needs an interpreter", "write %post -c /bin/bash")
        return (*interpreter, Run.SCRIPT)
    return ("/bin/sh", "-ex", Run.SCRIPT)


def _shebanged(body: str, args: str) -> str:
    """A %runscript/%startscript/%test body as the file Apptainer writes."""
    if body.startswith("#!"):
        return body
    return f"#!/bin/sh{(' ' + args) if args else ''}\n\n{body}"


def parse(text: str, path: str, build_args: Mapping[str, str]) -> Recipe:
    """The recipe in definition file *text* (read from *path*)."""
    stages: list[Stage] = []
    for first, chunk in _chunks(text):
        _, raw_sections = _sections(chunk, path, first)  # for %arguments
        values = {**_arguments(raw_sections), **build_args}
        header, sections = _sections(_substitute(chunk, values, path, first), path, first)
        where = Where(path, first)
        kind = header.get("bootstrap", "").lower()
        if not kind:
            raise UsageError(f"{path}:{first}: no Bootstrap: header",
                             "start the file with 'Bootstrap: docker' and 'From: IMAGE'")
        if kind not in _SUPPORTED:
            hint = {"library": "use Bootstrap: docker or oras with a registry image",
                    "shub": "Singularity Hub is gone; use Bootstrap: docker",
                    "yum": "use Bootstrap: docker From: a distribution's image",
                    "dnf": "use Bootstrap: docker From: a distribution's image",
                    "zypper": "use Bootstrap: docker From: opensuse/leap",
                    "arch": "use Bootstrap: docker From: archlinux"}.get(
                        kind, "use docker, docker-archive, oci, oci-archive, localimage, "
                              "scratch, debootstrap or busybox")
            raise UsageError(f"{path}:{first}: Bootstrap: {kind} is not supported by capsid",
                             hint)
        ref = header.get("from", "")
        if kind not in ("scratch", "debootstrap", "busybox") and not ref:
            raise UsageError(f"{path}:{first}: Bootstrap: {kind} needs a From: header",
                             "add e.g. From: debian:12")
        if kind == "docker":  # Singularity 2's split name, joined as Apptainer joins it
            for part in ("namespace", "registry"):
                prefix = re.sub(r"^https?://", "", header.get(part, "").strip()).strip("/")
                if prefix:
                    ref = f"{prefix}/{ref}"
        options = {k: v for k, v in header.items() if k in ("osversion", "mirrorurl",
                                                             "include", "fingerprints")}
        if kind == "debootstrap":
            missing = [h for h, k in (("OSVersion", "osversion"), ("MirrorURL", "mirrorurl"))
                       if not options.get(k)]
            if missing:
                raise UsageError(f"{path}:{first}: Bootstrap: debootstrap needs "
                                 f"{' and '.join(missing)}",
                                 "e.g. OSVersion: bookworm and "
                                 "MirrorURL: http://deb.debian.org/debian")
        name = header.get("stage", str(len(stages)))
        stage = Stage(name=name, base=Base(_SUPPORTED[kind], ref, options), steps=[],
                      where=where, metadata=Metadata(), header=header)
        meta = stage.metadata
        assert meta is not None
        by_name: dict[str, list[tuple[str, str, int]]] = {}
        apps: dict[str, scif.App] = {}
        for section, args, body, number in sections:
            if section in scif.SECTIONS:
                scif.add(apps, section, args, body, Where(path, number))
            else:
                by_name.setdefault(section, []).append((args, body, number))
        if apps:  # made right after the bootstrap, as Apptainer makes them
            stage.steps += [scif.layout_step(list(apps.values())),
                            *scif.copies(list(apps.values()))]
        installs = scif.install_script(list(apps.values()))
        for args, body, number in by_name.get("files", []):
            if args:
                stage.steps += _files(args, body, Where(path, number))
        if by_name.get("setup"):  # repeated sections are one, concatenated
            parts = by_name["setup"]
            stage.steps.append(Setup("".join(body for _, body, _ in parts),
                                     Where(path, parts[0][2])))
        for args, body, number in by_name.get("files", []):
            if not args:
                stage.steps += _files(args, body, Where(path, number))
        if by_name.get("post") or installs:
            parts = by_name.get("post") or [("", "", next(iter(apps.values())).where.line)]
            args, number = parts[0][0], parts[0][2]
            body = "".join(body for _, body, _ in parts) + installs
            opening = next((line.strip() for line in body.splitlines() if line.strip()), "")
            title = " ".join(filter(None, ("%post", args))) + (f": {opening}" if opening else "")
            stage.steps.append(Run(_script_argv(args), f"{title}\n{body}",
                                   Where(path, number), script=body))
        for _args, body, _ in by_name.get("environment", []):
            meta.environment += body
        for section in ("runscript", "startscript", "test"):
            parts = by_name.get(section, [])
            if parts:
                combined = "".join(body for _, body, _ in parts)
                setattr(meta, section, _shebanged(combined, parts[0][0]))
        if by_name.get("help"):
            meta.help = "".join(body for _, body, _ in by_name["help"])
        for _args, body, _ in by_name.get("labels", []):
            for line in body.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    key, _, value = line.partition(" ")
                    meta.labels[key] = value.strip()
        stages.append(stage)
    return Recipe("def", path, text, stages)
