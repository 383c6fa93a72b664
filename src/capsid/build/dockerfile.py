"""Dockerfile → :class:`~capsid.build.recipe.Recipe`, with BuildKit's rules.

Line continuations and the ``# escape=`` directive, heredocs on RUN, shell and exec
(JSON) forms, ``ARG`` before and in stages (with the predefined ``TARGETARCH`` and
friends), ``$VAR`` expansion where Docker expands (not in RUN, CMD and ENTRYPOINT,
whose shell does it), multi-stage builds with ``AS`` and ``--target``.
Errors name file:line and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from capsid.build import words
from capsid.build.recipe import (
    Base,
    Config,
    Copy,
    Mount,
    Recipe,
    Run,
    Stage,
    Where,
    unresolved,
)
from capsid.errors import UsageError

_DIRECTIVE = re.compile(r"#\s*([a-zA-Z]+)\s*=\s*(.*)")
_HEREDOC = re.compile(r"<<(-?)\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
#: Instructions whose arguments Docker expands with the stage's ARG and ENV values.
_EXPANDED = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER",
             "VOLUME", "WORKDIR", "ARG", "ONBUILD"}
_KNOWN = _EXPANDED | {"RUN", "CMD", "ENTRYPOINT", "SHELL", "HEALTHCHECK", "MAINTAINER"}
DEFAULT_SHELL = ("/bin/sh", "-c")


def platform_args(arch: str) -> dict[str, str]:
    """The ARGs Docker predefines for a build for (and on) *arch* (OCI architecture name)."""
    values = {"TARGETOS": "linux", "TARGETARCH": arch, "TARGETVARIANT": "",
              "TARGETPLATFORM": f"linux/{arch}", "BUILDOS": "linux", "BUILDARCH": arch,
              "BUILDVARIANT": "", "BUILDPLATFORM": f"linux/{arch}"}
    return values


class _Scope(dict[str, str]):
    """A stage's ARG and ENV values. A name they lack may be in the base image's
    environment, which is known only when the stage builds: it expands to a marker that
    the builder replaces then (see :func:`capsid.build.recipe.resolve`)."""

    def get(self, key: str, default: str | None = None) -> str:  # type: ignore[override]
        return super().get(key, unresolved(key))


class _Line:
    __slots__ = ("heredocs", "number", "text")

    def __init__(self, number: int, text: str, heredocs: list[tuple[str, str]]) -> None:
        self.number, self.text, self.heredocs = number, text, heredocs


def _logical_lines(text: str, path: str) -> tuple[list[_Line], str]:
    """Instructions with continuations joined and heredoc bodies attached; the escape char."""
    raw = text.splitlines()
    escape = "\\"
    for line in raw:  # parser directives: only at the very top
        match = _DIRECTIVE.fullmatch(line.strip())
        if not match:
            break
        if match.group(1).lower() == "escape":
            escape = match.group(2).strip()
            if escape not in ("\\", "`"):
                raise UsageError(f"{path}:1: invalid escape character {escape!r}",
                                 "use # escape=\\ or # escape=`")
    lines: list[_Line] = []
    i = 0
    while i < len(raw):
        start = i
        stripped = raw[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        parts = []
        current = raw[i].rstrip()
        while current.endswith(escape) and not current.endswith(escape * 2):
            parts.append(current[:-1])
            i += 1
            while i < len(raw) and raw[i].strip().startswith("#"):
                i += 1  # comment lines inside a continuation are dropped
            if i >= len(raw):
                current = ""
                break
            current = raw[i].rstrip()
        parts.append(current)
        joined = " ".join(p.strip() for p in parts if p.strip()) if len(parts) > 1 \
            else parts[0].strip()
        i += 1
        heredocs = []
        keyword = joined.split(None, 1)[0].upper() if joined else ""
        if keyword in ("RUN", "COPY", "ADD"):
            for match in _HEREDOC.finditer(joined):
                strip_tabs, _, name = match.groups()
                body = []
                while i < len(raw) and raw[i].strip() != name:
                    body.append(raw[i].lstrip("\t") if strip_tabs else raw[i])
                    i += 1
                if i >= len(raw):
                    raise UsageError(f"{path}:{start + 1}: heredoc <<{name} is not closed",
                                     f"end it with a line holding only {name}")
                i += 1
                heredocs.append((name, "\n".join(body) + "\n"))
        lines.append(_Line(start + 1, joined, heredocs))
    return lines, escape


def _flags(rest: str, allowed: tuple[str, ...], where: Where, escape: str = "\\"
           ) -> tuple[dict[str, str], str]:
    """Leading ``--name=value`` flags of an instruction (their values as written: quotes
    and variables are the caller's to expand), and the rest."""
    found: dict[str, str] = {}
    while rest.startswith("--"):
        word = words.split(rest, escape)[0]  # quotes may hold blanks: --chown="a b"
        rest = rest[len(word):]
        name, eq, value = word[2:].partition("=")
        if name not in allowed:
            raise UsageError(f"{where}: unknown flag --{name}",
                             f"this instruction takes {', '.join('--' + a for a in allowed)}"
                             if allowed else "this instruction takes no flags")
        if name == "mount":
            found[name] = (found[name] + "\n" if name in found else "") + value
        else:
            found[name] = value if eq else "true"
        rest = rest.lstrip()
    return found, rest


def _exec_form(rest: str) -> list[str] | None:
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None  # Docker runs it in the shell form then
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _pairs(rest: str, env: Mapping[str, str], escape: str, where: Where,
           keyword: str) -> list[tuple[str, str]]:
    """``KEY=VALUE ...`` (or the old ``KEY VALUE``) of ENV and LABEL."""
    items = words.split(rest, escape)
    if not items:
        raise UsageError(f"{where}: {keyword} needs KEY=VALUE", f"write {keyword} KEY=VALUE")
    if "=" not in items[0].split('"')[0].split("'")[0]:
        if keyword == "LABEL" or len(items) < 2:
            raise UsageError(f"{where}: {keyword} {rest!r} is not KEY=VALUE",
                             f"write {keyword} KEY=VALUE")
        value = rest.split(None, 1)[1]
        return [(items[0], words.expand(value, env, escape, where=str(where)))]
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"{where}: {keyword} {item!r} is not KEY=VALUE",
                             f"write {keyword} KEY=VALUE")
        key = words.expand(key, env, escape, where=str(where))
        pairs.append((key, words.expand(value, env, escape, where=str(where))))
    return pairs


def parse(text: str, path: str, build_args: Mapping[str, str], *, arch: str = "amd64"
          ) -> Recipe:
    """The recipe in Dockerfile *text* (read from *path*), for *build_args*."""
    lines, escape = _logical_lines(text, path)
    predefined = platform_args(arch)
    global_args: dict[str, str] = dict(predefined)
    stages: list[Stage] = []
    stage: Stage | None = None
    env: dict[str, str] = {}  # the stage's ENV
    args: dict[str, str] = {}  # the stage's ARG values
    shell = list(DEFAULT_SHELL)
    for line in lines:
        where = Where(path, line.number)
        keyword, _, rest = line.text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            flags, rest = _flags(rest, ("platform",), where, escape)
            items = words.split(rest, escape)
            scope = {**global_args, **{k: v for k, v in build_args.items()
                                       if k in global_args}}
            flags = {k: words.expand(v, scope, escape, where=str(where))
                     for k, v in flags.items()}
            if not items or len(items) not in (1, 3) or (
                    len(items) == 3 and items[1].upper() != "AS"):
                raise UsageError(f"{where}: FROM {rest!r} is not 'FROM IMAGE [AS NAME]'",
                                 "write FROM image:tag AS name")
            ref = words.expand(items[0], scope, escape, where=str(where))
            name = items[2].lower() if len(items) == 3 else str(len(stages))
            if not ref:
                raise UsageError(f"{where}: FROM names no image (an empty build arg?)",
                                 "give an image, e.g. FROM debian:12")
            base = (Base("scratch") if ref == "scratch" else
                    Base("stage", ref.lower()) if any(s.name == ref.lower() for s in stages)
                    else Base("docker", ref))
            stage = Stage(name=name, base=base, steps=[], where=where,
                          platform=flags.get("platform"))
            stages.append(stage)
            env, args, shell = {}, {}, list(DEFAULT_SHELL)
            continue
        if keyword == "ARG" and stage is None:
            for item in words.split(rest, escape):
                key, eq, default = item.partition("=")
                value = build_args.get(key, words.expand(default, global_args, escape,
                                                         where=str(where)) if eq else "")
                global_args[key] = value
            continue
        if stage is None:
            raise UsageError(f"{where}: {keyword} before the first FROM",
                             "start the Dockerfile with FROM (only ARG may come before it)")
        if keyword not in _KNOWN:
            raise UsageError(f"{where}: unknown instruction {keyword}",
                             "see the Dockerfile reference for the instructions")
        scope = _Scope({**args, **env})
        step_env = tuple(sorted(args.items()))
        text = f"{keyword} {rest}"
        if keyword == "RUN":
            flags, rest = _flags(rest, ("mount", "network", "security"), where, escape)
            flags = {k: "\n".join(words.expand(v, scope, escape, where=str(where))
                                  for v in value.split("\n"))
                     for k, value in flags.items()}
            argv = _exec_form(rest)
            mounts = tuple(_run_mounts(flags.get("mount", ""), where))
            if line.heredocs and _HEREDOC.fullmatch(rest.strip()):
                # RUN <<EOF: the body is the script (run by its #! line, or the shell)
                body = line.heredocs[0][1]
                run_argv = (Run.SCRIPT,) if body.startswith("#!") else (*shell, body)
                stage.steps.append(Run(run_argv, f"{text}\n{body}", where, mounts,
                                       step_env, body if body.startswith("#!") else None))
            elif line.heredocs:
                # RUN cmd <<EOF: the shell reads the heredocs itself
                script = rest + "\n" + "".join(f"{body}{name}\n" for name, body
                                               in line.heredocs)
                stage.steps.append(Run((*shell, script), f"{text}\n{script}", where, mounts,
                                       step_env))
            else:
                stage.steps.append(Run(tuple(argv) if argv is not None else (*shell, rest),
                                       text, where, mounts, step_env))
        elif keyword in ("COPY", "ADD"):
            allowed = ("from", "chown", "chmod", "link", "parents") if keyword == "COPY" \
                else ("chown", "chmod", "link", "checksum", "keep-git-dir")
            flags, rest = _flags(rest, allowed, where, escape)
            # flag values follow the arguments' word rules: --chown="${UID}:${GID}"
            flags = {k: words.expand(v, scope, escape, where=str(where))
                     for k, v in flags.items()}
            if line.heredocs:  # COPY <<EOF /dest: the heredoc's body is the file
                rest = _HEREDOC.sub(lambda m: m.group(3), rest)
            items = _exec_form(rest) or words.split(rest, escape)
            items = [words.expand(i, scope, escape, where=str(where)) for i in items]
            if len(items) < 2:
                raise UsageError(f"{where}: {keyword} needs a source and a destination",
                                 f"write {keyword} SRC... DEST")
            chmod = flags.get("chmod")
            if chmod is not None and not re.fullmatch(r"[0-7]{3,4}", chmod):
                raise UsageError(f"{where}: --chmod={chmod} is not an octal mode",
                                 "write e.g. --chmod=0755")
            from_stage = flags.get("from")
            checksum = flags.get("checksum")
            if checksum is not None:
                _check_checksum(checksum, items[:-1], where)
            stage.steps.append(Copy(tuple(items[:-1]), items[-1], where, checksum=checksum,
                                    from_stage=from_stage.lower() if from_stage else None,
                                    chmod=int(chmod, 8) if chmod else None,
                                    chown=flags.get("chown"), extract=keyword == "ADD",
                                    inline=tuple(line.heredocs)))
        elif keyword == "ENV":
            pairs = _pairs(rest, scope, escape, where, "ENV")
            env.update(pairs)
            stage.steps.append(Config("Env", dict(pairs), text, where))
        elif keyword == "ARG":
            for item in words.split(rest, escape):
                key, eq, default = item.partition("=")
                if key in build_args:
                    value = build_args[key]
                elif eq:
                    value = words.expand(default, scope, escape, where=str(where))
                else:
                    value = global_args.get(key, "")
                args[key] = value
                scope[key] = value
            stage.steps.append(Config("Arg", dict(args), text, where))
        elif keyword == "LABEL":
            stage.steps.append(Config("Labels", dict(_pairs(rest, scope, escape, where,
                                                            "LABEL")), text, where))
        elif keyword == "MAINTAINER":
            stage.steps.append(Config("Labels", {"maintainer": rest}, text, where))
        elif keyword == "WORKDIR":
            value = words.expand(rest, scope, escape, where=str(where))
            stage.steps.append(Config("WorkingDir", value, text, where))
        elif keyword == "USER":
            stage.steps.append(Config("User", words.expand(rest, scope, escape,
                                                           where=str(where)), text, where))
        elif keyword in ("CMD", "ENTRYPOINT"):
            command = _exec_form(rest)
            stage.steps.append(Config("Cmd" if keyword == "CMD" else "Entrypoint",
                                      command if command is not None else [*shell, rest],
                                      text, where))
        elif keyword == "SHELL":
            new_shell = _exec_form(rest)
            if not new_shell:
                raise UsageError(f"{where}: SHELL must be a JSON list",
                                 'write SHELL ["/bin/bash", "-c"]')
            shell = new_shell
            stage.steps.append(Config("Shell", new_shell, text, where))
        elif keyword == "EXPOSE":
            ports = [words.expand(p, scope, escape, where=str(where))
                     for p in words.split(rest, escape)]
            stage.steps.append(Config("ExposedPorts", {p if "/" in p else f"{p}/tcp": {}
                                                       for p in ports}, text, where))
        elif keyword == "VOLUME":
            paths = _exec_form(rest) or words.split(rest, escape)
            stage.steps.append(Config("Volumes", {words.expand(p, scope, escape): {}
                                                  for p in paths}, text, where))
        elif keyword == "STOPSIGNAL":
            stage.steps.append(Config("StopSignal", words.expand(rest, scope, escape),
                                      text, where))
        elif keyword == "HEALTHCHECK":
            stage.steps.append(Config("Healthcheck", rest, text, where))
        elif keyword == "ONBUILD":
            stage.steps.append(Config("OnBuild", rest, text, where))
    if not stages:
        raise UsageError(f"{path} has no FROM instruction",
                         "a Dockerfile starts with FROM IMAGE (or FROM scratch)")
    return Recipe("dockerfile", path, text, stages)


def _run_mounts(spec: str, where: Where) -> list[Mount]:
    """``RUN --mount=type=bind|cache|tmpfs|secret,...`` items."""
    found = []
    for item in filter(None, spec.split("\n")):
        fields = dict(f.partition("=")[::2] for f in item.split(","))
        kind = fields.get("type", "bind")
        target = fields.get("target") or fields.get("dst") or fields.get("destination")
        if kind == "secret":  # BuildKit's: /run/secrets/ID, and/or a variable
            name = fields.get("id") or (target or "").rstrip("/").rpartition("/")[2]
            if not name:
                raise UsageError(f"{where}: RUN --mount={item} names no secret",
                                 "write --mount=type=secret,id=NAME")
            found.append(Mount("secret", target or ("" if fields.get("env") else
                                                    f"/run/secrets/{name}"),
                               id=name, required=fields.get("required", "false")
                               in ("", "true"), env=fields.get("env", "")))
            continue
        if kind not in ("bind", "cache", "tmpfs") or not target:
            raise UsageError(f"{where}: RUN --mount={item} is not supported",
                             "capsid takes --mount=type=bind|cache|tmpfs|secret,target=PATH")
        writable = "rw" in fields or "readwrite" in fields or kind != "bind"
        found.append(Mount(kind, target, fields.get("source") or fields.get("src") or "",
                           fields.get("from", ""), not writable, fields.get("id", target)))
    return found


def _check_checksum(checksum: str, sources: list[str], where: Where) -> None:
    """``ADD --checksum``: a digest, of the one URL it goes with (as BuildKit takes it)."""
    if not re.fullmatch(r"(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})",
                        checksum):
        raise UsageError(f"{where}: --checksum={checksum} is not a digest",
                         "write --checksum=sha256:<64 hex digits>")
    if len(sources) != 1 or not sources[0].startswith(("http://", "https://")):
        raise UsageError(f"{where}: --checksum is for one http(s) URL, not {' '.join(sources)}",
                         "drop --checksum, or ADD a single URL")
