"""The one image writer: a root filesystem as a tar stream, with Apptainer's metadata,
into a SIF or a sandbox directory.

Whatever the source (an OCI image's layers, a build's step directories, a sandbox
directory), it adds its entries newest first to a :class:`~capsid.image.flatten.Flattener`.
The writer puts the ``/.singularity.d`` files made for the image in front of them and
the standard skeleton behind them (an image's own files win over the skeleton, the
generated ones over the image's), and sends the stream to ``tar2sqfs`` (then wraps the
squashfs in a SIF) or to GNU tar (a sandbox). :func:`sif_from_partition` is the one
place a SIF is put together; every output is written atomically.
"""

from __future__ import annotations

import os
import tarfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from capsid import log
from capsid.errors import UsageError
from capsid.image import meta, output, sif, squashfs
from capsid.image.flatten import Flattener

LOG = log.get(__name__)

#: adds the image's own entries, newest first; returns the newest mtime it saw, or None
Fill = Callable[[Flattener], "int | None"]


@dataclass(frozen=True)
class Target:
    """Where an image goes, and how."""

    path: Path
    sandbox: bool = False  #: a directory, not a SIF
    compression: str = "zstd"
    force: bool = False  #: replace an existing output
    owners: bool = False  #: a sandbox keeps the stream's owners (a build with mapped ids)


@dataclass(frozen=True)
class Extras:
    """What a SIF holds besides its root filesystem."""

    arch: str
    objects: Sequence[sif.NewObject] = ()  #: stored before the standard objects
    oci_config: bytes | None = None  #: kept as ``oci-config.json``
    image_id: uuid.UUID | None = None  #: None: derived from the objects' bytes


@dataclass(frozen=True)
class Lower:
    """A SIF or squashfs file that already holds the oldest part of the image (a build's
    base): the rest is laid over its squashfs instead of compressing it again."""

    path: Path
    offset: int  #: where the squashfs starts in the file
    fill: Fill  #: streams what it holds, for when it cannot be used


def source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` if set (the reproducible-builds convention)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
                         "set it to a Unix time such as 1700000000, or unset it") from None


def write(target: Target, fill: Fill, extras: Extras, *, stamp: int | None = None,
          generated: Mapping[str, bytes] | None = None,
          present: Mapping[str, bytes | str] | None = None, lower: Lower | None = None) -> None:
    """Write the image that *fill* streams to *target*.

    *generated* (paths relative to ``/.singularity.d``) are files made for the image
    that win over its own; *present* are the ones it already has, for the SIF's
    metadata objects. Times are ``SOURCE_DATE_EPOCH``, else *stamp*, else the newest
    the source reported. With *lower*, *fill* streams only what is laid over it.
    """
    squashfs.check_compression(target.compression)
    made = dict(generated or {})
    runscript = made["runscript"].decode() if "runscript" in made else None
    epoch = source_date_epoch()
    first = epoch if epoch is not None else stamp

    def entries(flat: Flattener, whole: bool) -> int:
        """Add the image's entries (*whole*: the lower image's and the skeleton too)."""
        for rel, data in made.items():
            info = tarfile.TarInfo(f"{meta.ROOT}/{rel}")
            info.mode = 0o644 if rel == "labels.json" else 0o755
            info.mtime = first or 0
            flat.add_member(info, data)
        newest = fill(flat)
        if lower is not None and whole:
            newest = max(newest or 0, lower.fill(flat) or 0) or None
        final = first if first is not None else newest or 0
        if whole:
            for info, data in _skeleton(runscript, final):
                flat.add_member(info, data)
        return final

    def stream(write: Callable[[bytes | memoryview], object]) -> int:
        flat = Flattener(write)
        final = entries(flat, True)
        flat.finish()
        return final

    if target.sandbox:
        from capsid.image import untar

        with output.atomic_dir(target.path, target.force) as tmp:
            tmp.mkdir()
            untar.into(tmp, stream, owners=target.owners)
            os.chmod(tmp, 0o755)
        return
    with output.atomic_file(target.path, target.force) as tmp, \
            output.scratch(target.path, "sqfs") as part:
        final = _over(lower, part, target.path, target.compression, entries) \
            if lower else None
        if final is None:
            with squashfs.writer(part, target.compression) as pipe:
                final = stream(pipe.write)
        files: dict[str, bytes | str] = {
            rel[len(meta.ROOT) + 1:]: content
            for rel, (_mode, content) in meta.skeleton(runscript).items()
            if rel.startswith(meta.ROOT + "/") and content is not None}
        files.update(present or {})
        files.update(made)
        sif_from_partition(tmp, part, meta.Metadata.from_tree(files), extras, final)


def _over(lower: Lower, part: Path, beside: Path, compression: str,
          entries: Callable[[Flattener, bool], int]) -> int | None:
    """Squashfs *part*: what *entries* adds over *lower*, laid over it (the lower
    squashfs is not compressed again); None, and nothing written, where the two cannot
    be merged."""
    from capsid.image import sqmerge

    with open(lower.path, "rb") as low:
        level = sqmerge.zstd_level(low, lower.offset)  # so the two merge
    with output.scratch(beside, "upper") as upper:
        try:
            with squashfs.writer(upper, compression, level) as pipe:
                flat = Flattener(pipe.write)
                final = entries(flat, False)
                flat.finish()
            with open(lower.path, "rb") as low, open(upper, "rb") as up, \
                    open(part, "wb") as out:
                sqmerge.merge(low, lower.offset, up, out, flat.cover())
            return final
        except sqmerge.Unmergeable as e:
            LOG.info("writing the whole image: %s", e)
            return None


def sif_from_partition(out: Path, part: Path, metadata: meta.Metadata, extras: Extras,
                       stamp: int) -> None:
    """Make SIF *out* (a new name) of squashfs file *part*, which is used up."""
    objects = [*extras.objects]
    if metadata.deffile:
        objects.append(sif.NewObject(sif.DataType.DEFFILE, metadata.deffile.encode()))
    if metadata.labels:
        objects.append(sif.NewObject(sif.DataType.LABELS, meta.labels_json(metadata.labels)))
    objects.append(sif.NewObject(sif.DataType.GENERIC_JSON, metadata.inspect_json(),
                                 "inspect-metadata.json"))
    if extras.oci_config is not None:
        objects.append(sif.NewObject(sif.DataType.GENERIC_JSON, extras.oci_config,
                                     "oci-config.json"))
    objects.append(sif.NewObject.partition(part, extras.arch))
    if extras.image_id is not None and sif.write_in_place(
            part, objects, created_at=stamp, image_id=extras.image_id):
        os.replace(part, out)  # the squashfs became the SIF: no copy of it
        return
    with open(out, "wb") as f:
        sif.write(f, objects, created_at=stamp, image_id=extras.image_id)


def _skeleton(runscript: str | None, stamp: int) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """The standard tree's entries; the flattener keeps those the image lacks."""
    for rel, (mode, content) in sorted(meta.skeleton(runscript).items()):
        info = tarfile.TarInfo(rel)
        info.mode, info.mtime = mode, stamp
        data = b""
        if content is None:
            info.type = tarfile.DIRTYPE
        elif isinstance(content, str):
            info.type, info.linkname = tarfile.SYMTYPE, content
        else:
            data = content
        yield info, data
