"""``capsid overlay create``: a persistent overlay image, as Apptainer makes it."""

from __future__ import annotations

import sys
from pathlib import Path

from capsid.cli.parser import from_variables, parser
from capsid.errors import UsageError


def run(verb: str, argv: list[str]) -> int:
    p = parser("overlay", "create [--size MiB] [--sparse] [--create-dir DIR]... FILE.img",
               "Create an ext3 overlay image for --overlay FILE.img: changes to a container "
               "are kept in it from run to run (FILE.img:ro reads it only).")
    p.add_argument("action", choices=("create",))
    p.add_argument("-s", "--size", type=int, default=64, metavar="MiB",
                   help="the image's size in MiB (default 64)")
    p.add_argument("--sparse", action="store_true",
                   help="a sparse file: disk space is taken as it fills")
    p.add_argument("-F", "--force", action="store_true", help="overwrite FILE.img")
    p.add_argument("--fakeroot", "-f", action="store_true",
                   help="for containers run with --fakeroot: its directories are root's")
    p.add_argument("--create-dir", action="append", default=[], metavar="DIR",
                   help="a directory of the container to make yours in the image (where "
                        "you may then write without --fakeroot); may be repeated")
    p.add_argument("image")
    args = from_variables(p, p.parse_args(argv), {"sparse": ("SPARSE",)})
    from capsid.runtime import overlayimg

    path = Path(args.image)
    if path.suffix == ".sif":
        raise UsageError("overlays inside SIF files are not supported by capsid",
                         "create a separate FILE.img")
    overlayimg.create(path, args.size, sparse=args.sparse, fakeroot=args.fakeroot,
                      force=args.force, directories=args.create_dir)
    sys.stderr.write(f"created the overlay image {path} ({args.size} MiB)\n")
    return 0
