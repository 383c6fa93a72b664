"""A recipe, whatever its syntax: stages of steps, as typed records.

The Dockerfile and definition-file parsers both produce a :class:`Recipe`; the
builder only ever sees these records. Values are already expanded (build args,
``$VAR`` in Dockerfiles, ``{{ var }}`` in definition files) where the syntax says so,
but for variables only the base image's environment knows: those stand as markers
(:func:`unresolved`) that the builder replaces when the stage's base is known
(:func:`resolve`), so ``ENV PATH=/x:$PATH`` extends the base's PATH.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_MARK = "\0"
_MARKED = re.compile("\0([A-Za-z_][A-Za-z0-9_]*)\0")


def unresolved(name: str) -> str:
    """A reference to variable *name* of the base image's environment."""
    return f"{_MARK}{name}{_MARK}"


def resolve(value: Any, env: Mapping[str, str]) -> Any:
    """*value* (a string, a collection or a step) with its markers replaced from *env*
    (the stage's environment; an unset variable is empty, as Docker expands it)."""
    if isinstance(value, str):
        return _MARKED.sub(lambda m: env.get(m.group(1), ""), value) if _MARK in value \
            else value
    if isinstance(value, tuple):
        return tuple(resolve(item, env) for item in value)
    if isinstance(value, list):
        return [resolve(item, env) for item in value]
    if isinstance(value, dict):
        return {resolve(k, env): resolve(v, env) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {f.name: resolve(getattr(value, f.name), env)
                   for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changed)
    return value


@dataclass(frozen=True)
class Where:
    """Where a step was written: file and line, for messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Mount:
    """``RUN --mount``: a bind from the context or a stage, a persistent cache, a tmpfs,
    or a secret given to the build (``--secret``)."""

    kind: str  #: "bind", "cache", "tmpfs" or "secret"
    target: str  #: where it is seen ("" for a secret given only as a variable)
    source: str = ""
    from_stage: str = ""
    readonly: bool = True
    id: str = ""  #: a cache's or a secret's name (a cache's target by default)
    required: bool = False  #: a secret the build must be given
    env: str = ""  #: a secret's variable, set for the step alone


@dataclass(frozen=True)
class Run:
    """Run a command as root in the image (RUN, %post). *argv* is exact; no shell is added."""

    argv: tuple[str, ...]
    text: str  #: as shown in progress lines and hashed for the cache
    where: Where
    mounts: tuple[Mount, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  #: build args in scope, set for this step only
    #: a script to run: bound at SCRIPT inside and named by *argv* (heredocs, %post)
    script: str | None = None

    SCRIPT = "/.capsid-build/script"


@dataclass(frozen=True)
class Copy:
    """Copy files from the build context or an earlier stage (COPY, ADD, %files)."""

    sources: tuple[str, ...]
    dest: str
    where: Where
    from_stage: str | None = None  #: a stage name or index, or an image reference
    chmod: int | None = None
    chown: str | None = None
    extract: bool = False  #: ADD: unpack local tar archives
    follow_links: bool = True  #: from the context, links are followed (Apptainer's %files)
    dockerish: bool = True  #: Docker's rules for "dir/" destinations and globs
    #: COPY <<NAME heredocs: (name, content); their names stand in *sources*
    inline: tuple[tuple[str, str], ...] = ()
    #: ADD --checksum=ALGORITHM:HEX: what a downloaded source must hash to
    checksum: str | None = None


@dataclass(frozen=True)
class Setup:
    """A definition file's %setup: a script run on the host with $APPTAINER_ROOTFS."""

    script: str
    where: Where


@dataclass(frozen=True)
class Config:
    """A change of the image's configuration only (ENV, WORKDIR, USER, CMD, LABEL, ...)."""

    key: str  #: "Env", "WorkingDir", "User", "Cmd", "Entrypoint", "Labels", "Shell", ...
    value: object
    text: str
    where: Where


Step = Run | Copy | Setup | Config


@dataclass(frozen=True)
class Base:
    """Where a stage starts: an image (``docker://…``, a file, ``scratch``) or a stage."""

    kind: str  #: "docker", "docker-archive", "oci", "oci-archive", "localimage",
    #: "scratch", "stage", "debootstrap", "busybox"
    ref: str = ""
    options: dict[str, str] = field(default_factory=dict)  #: OSVersion, MirrorURL, Include


@dataclass
class Metadata:
    """A definition file's image metadata, written into /.singularity.d at the end."""

    runscript: str | None = None
    startscript: str | None = None
    test: str | None = None
    help: str | None = None
    environment: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    """One stage: a base and the steps on it."""

    name: str
    base: Base
    steps: list[Step]
    where: Where
    platform: str | None = None
    metadata: Metadata | None = None  #: definition files only
    header: dict[str, str] = field(default_factory=dict)  #: definition files: the header


@dataclass
class Recipe:
    """Everything a build needs to know about what to build."""

    kind: str  #: "dockerfile" or "def"
    path: str
    text: str  #: the recipe as written (a def file is stored in the image)
    stages: list[Stage]

    def stage(self, name: str) -> int | None:
        """The index of the stage called *name* (or numbered so), if there is one."""
        for index, stage in enumerate(self.stages):
            if stage.name in (name, name.lower()) or (name.isdigit() and int(name) == index):
                return index
        return None

    def up_to(self, target: str | None) -> Recipe:
        """The recipe built up to stage *target* (``--target``): every stage with None."""
        if target is None:
            return self
        index = self.stage(target)
        if index is None:
            from capsid.errors import UsageError

            raise UsageError(f"{self.path} has no stage called {target!r}",
                             "stages: " + ", ".join(s.name for s in self.stages))
        return Recipe(self.kind, self.path, self.text, self.stages[:index + 1])
