"""``capsid build``: make a SIF or a sandbox from a sandbox or another image."""

from __future__ import annotations

import os
from pathlib import Path

from capsid.cli.parser import parser
from capsid.errors import CapsidError, UsageError


def run(verb: str, argv: list[str]) -> int:
    p = parser("build", "[options] OUTPUT SOURCE",
               "Build OUTPUT (a SIF file, or a directory with --sandbox) from SOURCE: a sandbox "
               "directory, a SIF or squashfs file, docker://REF, docker-archive:FILE, "
               "oci-archive:FILE or oci:DIR[:TAG].")
    p.add_argument("-s", "--sandbox", action="store_true",
                   help="write a sandbox directory instead of a SIF file")
    p.add_argument("-F", "--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument("--compression", default=os.environ.get("CAPSID_COMPRESSION", "zstd"),
                   help="squashfs compression: zstd (default), gzip, xz or lz4")
    p.add_argument("--arch", help="architecture to take from a multi-platform image")
    p.add_argument("--nohttps", "--no-https", action="store_true",
                   help="talk plain HTTP to the registry")
    p.add_argument("output")
    p.add_argument("source")
    args = p.parse_args(argv)

    from capsid.image import convert
    from capsid.image.locate import SANDBOX, locate
    from capsid.oci import sources

    source, output = args.source, Path(args.output)
    if sources.is_uri(source):
        if args.sandbox:
            raise UsageError("--sandbox from a registry or archive is not available yet",
                             "build a SIF, then: capsid build --sandbox DIR IMAGE.sif")
        from capsid.cli.pull import _nohttps

        opts = sources.Options(args.arch, _nohttps(args), args.compression, disable_cache=True)
        sources.to_sif(source, output, opts, force=args.force)
        return 0
    if "://" in source:
        raise CapsidError(f"building from {source.split('://', 1)[0]}:// sources is not "
                          "supported", "use docker://, oras://, docker-archive:, oci-archive: "
                          "or oci:, a sandbox directory or a SIF file")
    if source.endswith((".def", "Dockerfile")) or Path(source).name.startswith("Dockerfile"):
        raise CapsidError(f"building from the recipe {source} is not available in this version",
                          "build from a sandbox directory or a SIF/squashfs file")
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
