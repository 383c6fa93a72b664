"""Bind specifications: ``-B src[:dst[:opts]]``, ``--mount type=bind,...`` and their sources."""

from __future__ import annotations

import os

from capsid.errors import UsageError


class BindSpec:
    """One host path to bind into the container."""

    __slots__ = ("destination", "readonly", "scratch", "source")

    def __init__(self, source: str, destination: str, readonly: bool = False,
                 scratch: str | None = None) -> None:
        self.source = source
        self.destination = destination
        self.readonly = readonly
        #: a directory of the caller's: writes land there, over the source, and the source
        #: never changes (a build's ``RUN --mount=type=bind,rw``)
        self.scratch = scratch

    def _key(self) -> tuple[str, str, bool, str | None]:
        return (self.source, self.destination, self.readonly, self.scratch)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BindSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        extra = f", scratch={self.scratch!r}" if self.scratch else ""
        return (f"BindSpec({self.source!r}, {self.destination!r}, "
                f"readonly={self.readonly}{extra})")


def parse_bind(text: str) -> list[BindSpec]:
    """Parse one ``--bind`` value, which may hold a comma-separated list."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) > 3:
            raise UsageError(f"bind {item!r} has too many ':'",
                             "write it as src[:dst[:ro|rw]]")
        src = fields[0]
        dst = fields[1] if len(fields) > 1 and fields[1] else src
        opts = fields[2] if len(fields) > 2 else ""
        if len(fields) == 2 and fields[1] in ("ro", "rw"):
            dst, opts = src, fields[1]
        readonly = False
        for opt in filter(None, opts.split(";")):
            if opt == "ro":
                readonly = True
            elif opt != "rw":
                raise UsageError(f"unknown bind option {opt!r} in {item!r}",
                                 "the options are ro and rw")
        specs.append(_spec(src, dst, readonly, item))
    return specs


def parse_mount(text: str) -> BindSpec:
    """Parse one ``--mount`` value: ``type=bind,src=…,dst=…[,ro]`` (CSV-quoted)."""
    import csv

    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise UsageError(f"--mount {text!r} is not a comma-separated list of fields",
                         "use type=bind,src=PATH,dst=PATH[,ro] on one line") from None
    values: dict[str, str] = {}
    readonly = False
    for f in fields:
        key, sep, value = f.partition("=")
        key = key.strip()
        if key in ("ro", "readonly") and not sep:
            readonly = True
        elif key in ("source", "src"):
            values["src"] = value
        elif key in ("destination", "dst", "target"):
            values["dst"] = value
        elif key == "type":
            values["type"] = value
        elif key in ("ro", "readonly"):
            readonly = value.lower() in ("true", "1", "yes")
        else:
            raise UsageError(f"unknown --mount field {key!r}",
                             "use type=bind,src=PATH,dst=PATH[,ro]")
    if values.get("type", "bind") != "bind":
        raise UsageError(f"--mount type {values['type']!r} is not supported",
                         "only type=bind is supported")
    if "src" not in values or "dst" not in values:
        raise UsageError(f"--mount {text!r} needs src= and dst=",
                         "use type=bind,src=PATH,dst=PATH[,ro]")
    return _spec(values["src"], values["dst"], readonly, text)


def _spec(src: str, dst: str, readonly: bool, text: str) -> BindSpec:
    if not src or not dst:
        raise UsageError(f"bind {text!r} has an empty path", "write it as src[:dst[:ro|rw]]")
    if not dst.startswith("/"):
        raise UsageError(f"bind destination {dst!r} is not an absolute path",
                         "give destinations inside the container as absolute paths")
    return BindSpec(os.path.abspath(os.path.expanduser(src)), os.path.normpath(dst), readonly)
