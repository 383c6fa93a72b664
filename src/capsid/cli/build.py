"""``capsid build``: make a SIF or a sandbox from a sandbox or another image."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from capsid.cli.parser import from_variables, parser
from capsid.errors import UsageError


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
               "or oci:DIR[:TAG]. With -f FILE, SOURCE is the build context directory; a "
               "directory with a Dockerfile or Containerfile (and no root file system) is "
               "one, as for docker build DIR.")
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
    recipe.add_argument("--secret", action="append", default=[],
                        metavar="id=NAME[,src=FILE|,env=VARIABLE]",
                        help="a secret for RUN --mount=type=secret,id=NAME (never kept in "
                             "the image); repeatable")
    recipe.add_argument("--reproducible", action="store_true",
                        help="date the image's files by its base image's creation, as "
                             "SOURCE_DATE_EPOCH would (which wins when set)")
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
    from capsid.cli import sign

    sign.add_signing(p)
    args = from_variables(p, p.parse_args(argv), {
        "sandbox": ("SANDBOX",), "section": ("SECTION",), "notest": ("NOTEST",),
        "arch": ("BUILD_ARCH",), "no_cache": ("DISABLE_CACHE",), "mount": ("MOUNT",),
        "ignore_subuid": ("IGNORE_SUBUID",), "reproducible": ("REPRODUCIBLE",)})
    if args.sandbox and (args.sign or args.keyidx is not None or args.sign_key):
        raise UsageError("a sandbox directory cannot be signed", "build a SIF to sign it")
    status = _build(args)
    sign.sign_output(Path(args.output), args)
    return status


def _build(args: argparse.Namespace) -> int:
    if args.source is None:
        raise UsageError("build needs OUTPUT and SOURCE", "see 'capsid build --help'")
    from capsid import build

    if args.file is None and os.path.isdir(args.source):  # docker build DIR
        found = build.context_recipe(Path(args.source))
        args.file = str(found) if found is not None else None
    if args.file is not None or args.format or build.syntax(Path(args.source)):
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


def _build_arguments(args: argparse.Namespace) -> dict[str, str]:
    values: dict[str, str] = {}
    if args.build_arg_file:
        from capsid.image.locate import read_limited

        lines = read_limited(args.build_arg_file, "build argument file", "give a file of "
                             "KEY=VALUE lines").decode(errors="replace").splitlines()
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
    from capsid import build, log
    from capsid.build.builder import BuildOptions
    from capsid.runtime.binds import parse_bind, parse_mount

    recipe = Path(args.file) if args.file else Path(args.source)
    build.build(recipe, Path(args.output), BuildOptions(
        context=Path(args.context or (args.source if args.file else recipe.parent)),
        build_args=_build_arguments(args), target=args.target, no_cache=args.no_cache,
        notest=args.notest, sections=tuple(args.section.split(",")) if args.section else None,
        binds=(*(b for item in args.bind for b in parse_bind(item)),
               *(parse_mount(item) for item in args.mount)),
        arch=args.arch, nohttps=_nohttps_of(args), compression=args.compression,
        quiet=not log.enabled(log.NORMAL), syntax=args.format, sandbox=args.sandbox,
        force=args.force, ignore_subuid=args.ignore_subuid,
        reproducible=args.reproducible, secrets=_secrets(args.secret)))
    return 0


def _secrets(specs: list[str]) -> dict[str, bytes]:
    """``--secret id=NAME,src=FILE`` (or ``env=VARIABLE``; with neither, the variable
    NAME), as docker build takes them."""
    from capsid.image.locate import read_limited

    secrets: dict[str, bytes] = {}
    for spec in specs:
        fields = dict(f.partition("=")[::2] for f in spec.split(","))
        name = fields.get("id", "")
        source = fields.get("src") or fields.get("source")
        variable = fields.get("env") or (None if source else name)
        if not name or (source and fields.get("env")):
            raise UsageError(f"--secret {spec!r} is not id=NAME,src=FILE or id=NAME,env=VAR",
                             "e.g. --secret id=token,src=$HOME/.token")
        if source:
            secrets[name] = read_limited(source, f"secret {name}", "give a readable file")
        elif variable and variable in os.environ:
            secrets[name] = os.environ[variable].encode(errors="surrogateescape")
        else:
            raise UsageError(f"--secret {spec!r}: no variable {variable} is set",
                             f"export {variable}, or give the file: src=FILE")
    return secrets


def _nohttps_of(args: argparse.Namespace) -> bool:
    from capsid.cli.pull import _nohttps

    return bool(_nohttps(args))
