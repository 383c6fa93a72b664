"""Conversions between image kinds: sandbox → SIF, SIF → sandbox, squashfs → SIF.

Every output is written atomically (see :mod:`capsid.image.output`).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path

from capsid import log
from capsid.errors import UsageError
from capsid.image import meta, output, sandbox, sif, squashfs
from capsid.image.locate import SANDBOX, SIF, locate

LOG = log.get(__name__)


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


def _missing_skeleton(names: set[str], dirs: set[str], mtime: int) -> Iterable[tarfile.TarInfo]:
    """Members of the standard tree that the image does not have yet."""
    for rel, (mode, content) in sorted(meta.skeleton().items()):
        if rel in names:
            continue
        parents = [str(p) for p in Path(rel).parents if str(p) != "."]
        if any(p in names and p not in dirs for p in parents):
            continue  # a parent is a file or a symlink in the image: leave it alone
        info = tarfile.TarInfo(rel)
        info.mode, info.mtime, info.uid, info.gid = mode, mtime, 0, 0
        if content is None:
            info.type = tarfile.DIRTYPE
            dirs.add(rel)
        elif isinstance(content, str):
            info.type, info.linkname = tarfile.SYMTYPE, content
        else:
            info.size = len(content)
        names.add(rel)
        yield info


def sif_objects(metadata: meta.Metadata, partition: Path, arch: str,
                 oci_config: bytes | None = None) -> list[sif.NewObject]:
    objects = []
    if metadata.deffile:
        objects.append(sif.NewObject(sif.DataType.DEFFILE, metadata.deffile.encode()))
    if metadata.labels:
        objects.append(sif.NewObject(sif.DataType.LABELS, meta.labels_json(metadata.labels)))
    objects.append(sif.NewObject(sif.DataType.GENERIC_JSON, metadata.inspect_json(),
                                 "inspect-metadata.json"))
    if oci_config is not None:
        objects.append(sif.NewObject(sif.DataType.GENERIC_JSON, oci_config, "oci-config.json"))
    objects.append(sif.NewObject.partition(partition, arch))
    return objects


def sandbox_to_sif(src: Path, out: Path, *, compression: str = "zstd",
                   force: bool = False) -> None:
    """Make SIF *out* from sandbox directory *src*, adding any missing ``/.singularity.d``."""
    sandbox.check_dir(src)
    squashfs.check_compression(compression)
    arch = sandbox.detect_arch(src)
    with output.atomic_file(out, force) as tmp, output.scratch(out, "sqfs") as part:
        with squashfs.create(part, compression) as tar:
            names, dirs, newest = sandbox.add_tree(tar, src)
            epoch = source_date_epoch()
            stamp = newest if epoch is None else epoch
            skeleton = meta.skeleton()
            for info in _missing_skeleton(names, dirs, stamp):
                content = skeleton[info.name][1]
                if isinstance(content, bytes):
                    tar.addfile(info, io.BytesIO(content))
                else:
                    tar.addfile(info)
        files: dict[str, bytes | str] = {
            rel[len(meta.ROOT) + 1:]: content
            for rel, (_mode, content) in skeleton.items()
            if rel.startswith(meta.ROOT + "/") and content is not None
        }
        files.update(squashfs.read_dir(src / meta.ROOT))
        metadata = meta.Metadata.from_tree(files)
        with open(tmp, "wb") as f:
            sif.write(f, sif_objects(metadata, part, arch), created_at=stamp)
    LOG.info("wrote %s (%s, %s)", out, arch, compression)


def image_to_sandbox(src: Path, out: Path, *, force: bool = False) -> None:
    """Unpack the root filesystem of SIF or squashfs *src* into directory *out*."""
    image = locate(src)
    if image.kind == SANDBOX:
        raise UsageError(f"{src} is already a sandbox directory",
                         "copy it with 'cp -a' if you need a second one")
    with output.atomic_dir(out, force) as tmp:
        squashfs.extract(Path(image.path), tmp, image.offset)
    LOG.info("unpacked %s into %s", src, out)


def image_to_sif(src: Path, out: Path, *, force: bool = False) -> None:
    """Copy SIF *src*, or wrap bare squashfs *src* in a SIF, as *out*."""
    image = locate(src)
    if image.kind == SIF:
        with output.atomic_file(out, force) as tmp:
            shutil.copyfile(src, tmp)
        return
    from capsid.image.inspect import metadata

    info = metadata(image)
    stamp = source_date_epoch() or int(src.stat().st_mtime)
    with output.atomic_file(out, force) as tmp, output.scratch(out, "sqfs") as part:
        with open(src, "rb") as f_in, open(part, "wb") as f_out:
            f_in.seek(image.offset)
            shutil.copyfileobj(f_in, f_out, 1 << 20)
        with open(tmp, "wb") as f:
            sif.write(f, sif_objects(info, part, sandbox.host_arch()), created_at=stamp)
