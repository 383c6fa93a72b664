"""``capsid sif list|info|header|dump``: SIF internals, printed as Apptainer's ``sif`` does."""

from __future__ import annotations

import datetime
import math
import sys

from capsid.cli.parser import parser
from capsid.errors import UsageError
from capsid.image import sif

RULE = "-" * 78


def _size(n: int) -> str:
    """A byte count as Go's siftool prints it: ``27 KiB``."""
    if -1024 < n < 1024:
        return f"{n} B"
    div, exp, q = 1024, 0, n // 1024
    while q <= -1024 or q >= 1024:
        div, exp, q = div * 1024, exp + 1, q // 1024
    return f"{math.floor(n / div + 0.5):.0f} {'KMGTPE'[exp]}iB"


def _time(seconds: int) -> str:
    try:
        when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (ValueError, OverflowError, OSError):  # a damaged or hostile header
        return f"{seconds} seconds after 1970 (out of range)"
    return when.strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _table(rows: list[tuple[str, str]], padding: int, indent: str = "") -> str:
    """Left-aligned key/value lines, like Go's tabwriter with the given padding."""
    width = max((len(k) for k, _ in rows), default=0) + padding
    return "".join(f"{indent}{k.ljust(width)}{v}\n" for k, v in rows)


def header_text(image: sif.SifImage) -> str:
    h = image.header
    rows = []
    if h.launch_script:
        rows.append(("Launch Script:", h.launch_script.rstrip("\n")))
    rows.append(("Version:", h.version))
    if h.arch != "unknown":
        rows.append(("Primary Architecture:", h.arch))
    if h.id.int:
        rows.append(("ID:", str(h.id)))
    if h.created_at != sif.ZERO_TIME:
        rows.append(("Created At:", _time(h.created_at)))
    if h.modified_at != sif.ZERO_TIME:
        rows.append(("Modified At:", _time(h.modified_at)))
    rows += [("Descriptors Free:", str(h.descriptors_free)),
             ("Descriptors Total:", str(h.descriptors_total)),
             ("Descriptors Offset:", str(h.descriptors_offset)),
             ("Descriptors Size:", _size(h.descriptors_size)),
             ("Data Offset:", str(h.data_offset)),
             ("Data Size:", _size(h.data_size))]
    return _table(rows, 1)


def list_text(image: sif.SifImage) -> str:
    out = [RULE, f"{'ID':<4} {'|GROUP':<8} {'|LINK':<8} {'|SIF POSITION (start-end)':<26} |TYPE",
           RULE]
    for d in image.descriptors:
        group = f"|{'NONE' if not d.group else d.group:<7}"
        link_id, is_group = d.link
        if not link_id:
            link = f"|{'NONE':<7}"
        elif is_group:
            link = f"|{link_id:<3} (G)"
        else:
            link = f"|{link_id:<7}"
        position = f"|{d.offset}-{d.offset + d.size} "
        out.append(f"{d.id:<4} {group} {link} {position:<26} |{d.details()}")
    return "\n".join(out) + "\n"


def info_text(d: sif.Descriptor) -> str:
    link_id, is_group = d.link
    rows = [("Data Type:", d.type_label), ("ID:", str(d.id)),
            ("Group ID:", str(d.group) if d.group else "NONE"),
            ("Linked ID:", "NONE" if not link_id else f"{link_id} (G)" if is_group
             else str(link_id)),
            ("Offset:", str(d.offset)), ("Size:", str(d.size))]
    if d.created_at != sif.ZERO_TIME:
        rows.append(("Created At:", _time(d.created_at)))
    if d.modified_at != sif.ZERO_TIME:
        rows.append(("Modified At:", _time(d.modified_at)))
    if d.name:
        rows.append(("Name:", d.name))
    if d.data_type == sif.DataType.PARTITION:
        fs, part, arch = d.partition()
        rows += [("Filesystem Type:", sif.FS_TYPE_LABELS.get(fs, str(fs))),
                 ("Partition Type:", sif.PART_TYPE_LABELS.get(part, str(part))),
                 ("Architecture:", arch)]
    elif d.data_type == sif.DataType.SIGNATURE:
        hash_type, entity = d.signature()
        rows.append(("Hash Type:", sif.HASH_TYPE_LABELS.get(hash_type, str(hash_type))))
        if entity.strip(b"\0"):
            rows.append(("Entity:", entity.hex().upper()))
    elif d.data_type == sif.DataType.CRYPTO_MESSAGE:
        fmt, msg = d.crypto_message()
        rows += [("Format Type:", sif.FORMAT_TYPE_LABELS.get(fmt, str(fmt))),
                 ("Message Type:", sif.MESSAGE_TYPE_LABELS.get(msg, str(msg)))]
    elif d.data_type == sif.DataType.SBOM:
        rows.append(("Format:", sif.SBOM_FORMAT_LABELS.get(d.sbom_format(), "unknown")))
    elif d.data_type in (sif.DataType.OCI_ROOT_INDEX, sif.DataType.OCI_BLOB):
        rows.append(("Digest:", d.oci_digest()))
    return _table(rows, 2, "  ")


def object_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise UsageError(f"{text!r} is not an object ID", "object IDs are whole numbers from 1")
    return value


def run(verb: str, argv: list[str]) -> int:
    p = parser("sif", "<list|info|header|dump> [ID] IMAGE.sif",
               "Look inside a SIF file: its global header, its objects, one object's "
               "metadata or raw contents.")
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True, prog=p.prog)
    sub.add_parser("list", help="list the data objects").add_argument("image")
    sub.add_parser("header", help="show the global header").add_argument("image")
    for name, what in (("info", "show one object's metadata"),
                       ("dump", "write one object's raw data to stdout")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("id")
        sp.add_argument("image")
    args = p.parse_args(argv)
    with sif.SifImage(args.image) as image:
        if args.action == "list":
            sys.stdout.write(list_text(image))
        elif args.action == "header":
            sys.stdout.write(header_text(image))
        elif args.action == "info":
            sys.stdout.write(info_text(image.get(object_id(args.id))))
        else:
            sys.stdout.flush()
            image.copy_to(image.get(object_id(args.id)), sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return 0
