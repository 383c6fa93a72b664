"""The builder: Dockerfiles and Apptainer definition files to SIFs and sandboxes.

:func:`build` is the one entry, for the CLI and Python callers alike: it reads and
parses the recipe, enters the build's user namespace, runs the steps
(:mod:`capsid.build.builder`), writes the image (:mod:`capsid.build.assemble`) and
runs its ``%test``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.build.builder import BuildOptions


def build(recipe: str | os.PathLike[str], out: str | os.PathLike[str],
          options: BuildOptions | None = None) -> None:
    """Build the image of *recipe* (a Dockerfile or a definition file) into *out*.

    The build runs in a child process (:mod:`capsid.runtime.child`): the namespaces it
    enters are never the caller's. Its failures are raised here as CapsidErrors.
    """
    from capsid.errors import CapsidError
    from capsid.runtime import child

    status = child.start(lambda _report: _build(Path(recipe), Path(out), options)).wait()
    if status != 0:
        raise CapsidError(f"the build ended with status {status}",
                          "run again with --debug, and report it if it happens again")


def _build(path: Path, target: Path, options: BuildOptions | None) -> None:
    from capsid import log
    from capsid.build import assemble, builder, deffile, dockerfile
    from capsid.image import output
    from capsid.image.locate import open_file

    opts = options or builder.BuildOptions()
    # a regular file only: a FIFO given by mistake must not hang the build
    with open(open_file(str(path), "recipe"), encoding="utf-8",
              errors="surrogateescape") as f:
        text = f.read()
    output.check_target(target, opts.force)
    if (opts.syntax or syntax(path, text)) == "def":
        parsed = deffile.parse(text, str(path), opts.build_args)
    else:
        parsed = dockerfile.parse(text, str(path), opts.build_args, arch=opts.platform[0])
    parsed = parsed.up_to(opts.target)
    if opts.context is None:
        opts.context = path.parent
    if not opts.ignore_subuid or os.geteuid() == 0:  # root's steps are never the host's root
        from capsid.runtime import identity, userns

        if userns.enter_for_build(identity.User.current()):
            log.get(__name__).debug("build: running as root with the ids /etc/subuid grants")
            from capsid.runtime import linux

            # new credentials clear the parent-death signal: die with the caller again
            linux.parent_death_signal(9)
            if os.getppid() == 1:
                os._exit(255)
    result, made = builder.run_stages(parsed, opts)
    assemble.write(result, made, target, sandbox=opts.sandbox, force=opts.force,
                   compression=opts.compression)
    if not opts.notest and (opts.sections is None or "test" in opts.sections):
        assemble.run_test(result, target, opts.sandbox, opts.quiet)


def syntax(path: Path, text: str | None = None) -> str | None:
    """The recipe syntax of *path*: "def" (a ``.def`` name, or a ``Bootstrap:`` header as
    Apptainer reads it), "dockerfile" (Dockerfile, Containerfile, ``*.dockerfile``), or
    None where it is no recipe (an image, a directory). *text*: its content, if read."""
    name = path.name
    if text is None:
        text = _head(path)
        if text is None:
            return "def" if name.endswith(".def") else "dockerfile" if name in (
                "Dockerfile", "Containerfile") else None
    if name.endswith(".def") or _bootstrap(text):
        return "def"
    if name.endswith((".dockerfile", ".Dockerfile")) or name.startswith(
            ("Dockerfile", "Containerfile")):
        return "dockerfile"
    return None


def context_recipe(directory: Path) -> Path | None:
    """The Dockerfile (or Containerfile) of *directory* given as a build's source, as
    ``docker build DIR`` reads it; None where there is none, or where *directory* is a
    sandbox (a root file system: Apptainer builds a SIF of it)."""
    if (directory / ".singularity.d").is_dir() or \
            ((directory / "etc").is_dir() and (directory / "usr").is_dir()):
        return None
    for name in ("Dockerfile", "Containerfile"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _head(path: Path) -> str | None:
    """The start of *path* if it is a regular file and no image; else None."""
    from capsid.errors import CapsidError
    from capsid.image.locate import open_file

    try:
        with open(open_file(str(path), "recipe"), "rb") as f:
            head = f.read(64 << 10)
    except (OSError, CapsidError):
        return None
    if head.startswith((b"SIF_MAGIC", b"hsqs", b"#!/usr/bin/env run-singularity")) or \
            b"SIF_MAGIC" in head[:64]:
        return None
    return head.decode(errors="replace")


def _bootstrap(text: str) -> bool:
    """Whether the header (the lines before the first %section) has ``Bootstrap:``."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("%"):
            break
        if re.match(r"(?i)bootstrap\s*:", line):
            return True
    return False
