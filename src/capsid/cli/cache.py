"""``capsid cache list|clean``: the blob and SIF cache under $CAPSID_CACHEDIR."""

from __future__ import annotations

import sys

from capsid.cli.parser import parser
from capsid.errors import UsageError

#: Apptainer's cache types (``--type``) → the kinds of capsid's cache they name: its
#: OCI blobs (ORAS SIFs are kept as blobs too), the SIFs converted from OCI images, and
#: capsid's build steps; Apptainer's library, shub and net caches have no counterpart
TYPES = {"blob": {"blob", "partial"}, "oras": {"blob", "partial"}, "oci": {"sif"},
         "library": set(), "shub": set(), "net": set(),
         "build": {"layer", "base", "mount", "image"}}


def _kinds(text: str | None) -> frozenset[str] | None:
    """The kinds ``--type`` names (None: all)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in names:
        return None
    unknown = [t for t in names if t not in TYPES]
    if unknown or not names:
        raise UsageError(f"--type {text!r}: unknown cache type {(unknown or [text])[0]!r}",
                         f"use a comma list of {', '.join(sorted(TYPES))} or all")
    return frozenset(kind for name in names for kind in TYPES[name])


def run(verb: str, argv: list[str]) -> int:
    p = parser("cache", "list|clean [options]",
               "Show or empty the cache of downloaded blobs, converted SIFs and build steps "
               "($CAPSID_CACHEDIR, default ~/.cache/capsid).")
    p.add_argument("action", choices=("list", "clean"))
    p.add_argument("-D", "--days", type=float,
                   help="clean: only what has not been used for this many days")
    p.add_argument("-n", "--dry-run", action="store_true", help="clean: only show what would go")
    p.add_argument("-v", "--verbose", action="store_true", help="list: every file")
    p.add_argument("-T", "--type", metavar="TYPES",
                   help="only these: a comma list of blob, oci (converted SIFs), oras, "
                        "build (build steps), library, shub, net, or all (the default)")
    p.add_argument("-f", "--force", action="store_true",
                   help="clean: accepted for Apptainer's scripts; capsid never asks first")
    args = p.parse_args(argv)
    kinds = _kinds(args.type)
    from capsid.runtime import identity, userns

    # Build steps may hold files of the user's subordinate ids: reach them as builds do.
    userns.enter_for_build(identity.User.current())
    from capsid.build.store import BuildStore
    from capsid.oci.store import Store

    store = Store()
    builds = BuildStore(store.root)
    if args.action == "clean":
        removed = store.clean(args.days, args.dry_run, kinds)
        if kinds is None or "layer" in kinds:
            removed += builds.clean(args.days, args.dry_run)
        if args.dry_run:
            for path in removed:
                sys.stdout.write(f"would remove {path}\n")
        sys.stderr.write(f"{'would remove' if args.dry_run else 'removed'} {len(removed)} "
                         f"files from {store.root}\n")
        return 0
    totals: dict[str, list[int]] = {}
    for kind, path, st in store.entries():
        if kinds is not None and kind not in kinds:
            continue
        count_size = totals.setdefault(kind, [0, 0])
        count_size[0] += 1
        count_size[1] += st.st_size
        if args.verbose:
            sys.stdout.write(f"{kind:8} {st.st_size:>14,} {path.name}\n")
    for kind, path, size, _used in builds.entries():
        if kinds is not None and kind not in kinds:
            continue
        count_size = totals.setdefault(kind, [0, 0])
        count_size[0] += 1
        count_size[1] += size
        if args.verbose:
            sys.stdout.write(f"{kind:8} {size:>14,} {path.name}\n")
    for kind in ("blob", "sif", "partial", "layer", "base", "mount", "image"):
        if kinds is not None and kind not in kinds:
            continue
        count, size = totals.get(kind, [0, 0])
        unit = "files" if kind in ("blob", "sif", "partial", "image") else "dirs "
        sys.stdout.write(f"{kind + 's':9} {count:6} {unit} {size / (1 << 20):10.1f} MiB\n")
    sys.stdout.write(f"location  {store.root}\n")
    return 0
