"""``capsid build``: make a SIF or a sandbox from a sandbox or another image."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from capsid.cli.parser import parser
from capsid.errors import CapsidError, UsageError


def _fakeroot_short_flags(argv: list[str]) -> list[str]:
    """Apptainer's ``build -f`` means --fakeroot; Docker's means --file FILE. A ``-f``
    followed by an option, nothing, or a path that is not an existing recipe file is
    Apptainer's."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg != "-f":
            continue
        nxt = out[i + 1] if i + 1 < len(out) else ""
        if not nxt or nxt.startswith("-") or nxt.endswith(".sif") or not os.path.isfile(nxt):
            out[i] = "--fakeroot"
    return out


def run(verb: str, argv: list[str]) -> int:
    argv = _fakeroot_short_flags(argv)
    p = parser("build", "[options] OUTPUT SOURCE",
               "Build OUTPUT (a SIF file, or a directory with --sandbox) from SOURCE: a "
               "Dockerfile or Apptainer definition file (a recipe), a sandbox directory, a "
               "SIF or squashfs file, docker://REF, docker-archive:FILE, oci-archive:FILE "
               "or oci:DIR[:TAG]. With -f FILE, SOURCE is the build context directory.")
    p.add_argument("-s", "--sandbox", action="store_true",
                   help="write a sandbox directory instead of a SIF file")
    p.add_argument("-F", "--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument("--compression", default=os.environ.get("CAPSID_COMPRESSION", "zstd"),
                   help="squashfs compression: zstd (default), gzip, xz or lz4")
    p.add_argument("--arch", help="architecture to take from a multi-platform image")
    p.add_argument("--nohttps", "--no-https", action="store_true",
                   help="talk plain HTTP to the registry")
    recipe = p.add_argument_group("recipes (Dockerfile, Containerfile, *.dockerfile, *.def)")
    recipe.add_argument("-f", "--file", metavar="FILE",
                        help="the recipe, when SOURCE is the context directory (as docker "
                             "build -f; a -f not followed by a recipe file is Apptainer's "
                             "--fakeroot)")
    recipe.add_argument("--format", choices=("dockerfile", "def"),
                        help="the recipe's syntax (default: from its name)")
    recipe.add_argument("--context", metavar="DIR",
                        help="the directory COPY and %%files read from (default: the "
                             "recipe's)")
    recipe.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a build argument (ARG, {{ KEY }}); repeatable")
    recipe.add_argument("--build-arg-file", metavar="FILE",
                        help="build arguments, one KEY=VALUE a line")
    recipe.add_argument("--target", metavar="STAGE", help="build up to this stage")
    recipe.add_argument("--no-cache", "--disable-cache", action="store_true",
                        help="run every step again, ignoring the build cache")
    recipe.add_argument("-T", "--notest", action="store_true", help="skip the %%test section")
    recipe.add_argument("--section", metavar="LIST",
                        help="definition files: run only these of setup,files,post")
    recipe.add_argument("-B", "--bind", action="append", default=[], metavar="SRC[:DST]",
                        help="bind a host path into RUN and %%post steps; repeatable")
    recipe.add_argument("--fakeroot", "--userns", action="store_true",
                        help="accepted for Apptainer's command lines: steps always run as "
                             "root in a user namespace")
    recipe.add_argument("--ignore-subuid", action="store_true",
                        help="map only yourself, even where /etc/subuid grants you ids "
                             "(then every file in the image is root's)")
    recipe.add_argument("--mount", action="append", default=[], metavar="SPEC",
                        help="bind a host path into RUN and %%post steps, in --mount syntax "
                             "(type=bind,src=S,dst=D[,ro]); repeatable")
    from capsid.cli import compat

    compat.add_to(p, "build")
    p.add_argument("output")
    p.add_argument("source", nargs="?")
    args = p.parse_args(argv)
    if args.source is None:
        raise UsageError("build needs OUTPUT and SOURCE", "see 'capsid build --help'")
    if args.file is not None or _is_recipe(args.source, args.format):
        return _build_recipe(args)

    from capsid.image import convert
    from capsid.image.locate import SANDBOX, locate
    from capsid.oci import sources

    source, output = args.source, Path(args.output)
    if sources.is_uri(source):
        from capsid.cli.pull import _nohttps

        opts = sources.Options(args.arch, _nohttps(args), args.compression, disable_cache=True)
        if args.sandbox:
            sources.to_sandbox(source, output, opts, force=args.force)
        else:
            sources.to_sif(source, output, opts, force=args.force)
        return 0
    if "://" in source:
        raise CapsidError(f"building from {source.split('://', 1)[0]}:// sources is not "
                          "supported", "use docker://, oras://, docker-archive:, oci-archive: "
                          "or oci:, a sandbox directory or a SIF file")
    image = locate(source)
    if args.sandbox:
        convert.image_to_sandbox(Path(source), output, force=args.force)
    elif image.kind == SANDBOX:
        convert.sandbox_to_sif(Path(source), output, compression=args.compression,
                               force=args.force)
    elif output.resolve() == Path(source).resolve():
        raise UsageError("OUTPUT and SOURCE are the same file", "choose another OUTPUT")
    else:
        convert.image_to_sif(Path(source), output, force=args.force)
    return 0


def _is_recipe(source: str, syntax: str | None) -> bool:
    if syntax is not None:
        return True
    name = Path(source).name
    return (os.path.isfile(source) and (name.endswith((".def", ".dockerfile", ".Dockerfile"))
            or name.startswith(("Dockerfile", "Containerfile")) or _has_bootstrap(source))) or (
        name.endswith(".def") or name in ("Dockerfile", "Containerfile"))


def _has_bootstrap(path: str) -> bool:
    """Whether *path* is a definition file whatever its name (``Singularity``, ``Apptainer``,
    ``recipe.txt``): as Apptainer decides, a regular file that is no image and opens with
    a ``Bootstrap:`` header (after comments and blank lines)."""
    from capsid.image.locate import open_file

    try:
        with open(open_file(path, "recipe"), "rb") as f:
            head = f.read(64 << 10)
    except (OSError, CapsidError):
        return False
    if head.startswith((b"SIF_MAGIC", b"hsqs", b"#!/usr/bin/env run-singularity")) or \
            b"SIF_MAGIC" in head[:64]:
        return False
    for line in head.decode(errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return re.match(r"(?i)bootstrap\s*:", line) is not None
    return False


def _build_arguments(args: argparse.Namespace) -> dict[str, str]:
    values: dict[str, str] = {}
    if args.build_arg_file:
        try:
            lines = Path(args.build_arg_file).read_text(errors="replace").splitlines()
        except OSError as err:
            raise UsageError(f"cannot read {args.build_arg_file}: {err.strerror}",
                             "check the path given to --build-arg-file") from None
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    for item in args.build_arg:
        key, sep, value = item.partition("=")
        if not sep:
            value = os.environ.get(key, "")  # docker build --build-arg NAME takes $NAME
        values[key] = value
    return values


def _build_recipe(args: argparse.Namespace) -> int:
    from capsid.build import assemble, builder, deffile, dockerfile
    from capsid.image import output
    from capsid.runtime.binds import parse_bind

    recipe_path = Path(args.file) if args.file else Path(args.source)
    context = Path(args.context or (args.source if args.file else recipe_path.parent))
    from capsid.image.locate import open_file

    # a regular file only: a FIFO given by mistake must not hang the build
    with open(open_file(str(recipe_path), "recipe"), encoding="utf-8",
              errors="surrogateescape") as f:
        text = f.read()
    syntax = args.format or ("def" if recipe_path.name.endswith(".def")
                             or re.search(r"(?im)^\s*bootstrap\s*:", text) else "dockerfile")
    values = _build_arguments(args)
    out = Path(args.output)
    output.check_target(out, args.force)
    if syntax == "def":
        parsed = deffile.parse(text, str(recipe_path), values)
        if args.target:
            index = parsed.stage(args.target)
            if index is None:
                raise UsageError(f"{recipe_path} has no stage called {args.target!r}",
                                 "stages: " + ", ".join(s.name for s in parsed.stages))
            parsed.stages = parsed.stages[:index + 1]
    else:
        from capsid.oci.image import parse_platform

        parsed = dockerfile.parse(text, str(recipe_path), values,
                                  arch=parse_platform(args.arch)[0], target=args.target)
    from capsid.runtime.binds import parse_mount

    binds = (*(b for item in args.bind for b in parse_bind(item)),
             *(parse_mount(item) for item in args.mount))
    from capsid import log

    opts = builder.BuildOptions(
        context=context, build_args=values, target=args.target, no_cache=args.no_cache,
        notest=args.notest, sections=tuple(args.section.split(",")) if args.section else None,
        binds=binds, arch=args.arch, nohttps=_nohttps_of(args), compression=args.compression,
        quiet=not log.enabled(log.NORMAL))
    if not args.ignore_subuid or os.geteuid() == 0:  # root's steps are never the host's root
        from capsid.runtime import identity, userns

        if userns.enter_for_build(identity.User.current()):
            log.get(__name__).debug("build: running as root with the ids /etc/subuid grants")
    result, made = builder.build(parsed, opts)
    assemble.write(result, made, out, sandbox=args.sandbox, force=args.force,
                   compression=args.compression)
    if not args.notest and (opts.sections is None or "test" in opts.sections):
        assemble.run_test(result, out, args.sandbox, opts.quiet)
    return 0


def _nohttps_of(args: argparse.Namespace) -> bool:
    from capsid.cli.pull import _nohttps

    return bool(_nohttps(args))
