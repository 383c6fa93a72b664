"""Conversions between image kinds: sandbox → SIF, SIF → sandbox, squashfs → SIF.

SIFs are written by :mod:`capsid.image.write`; every output is written atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from capsid import log
from capsid.errors import UsageError
from capsid.image import meta, output, sandbox, squashfs, write
from capsid.image.locate import SANDBOX, SIF, locate

LOG = log.get(__name__)


def sandbox_to_sif(src: Path, out: Path, *, compression: str = "zstd",
                   force: bool = False) -> None:
    """Make SIF *out* from sandbox directory *src*, adding any missing ``/.singularity.d``."""
    sandbox.check_dir(src)
    extras = write.Extras(sandbox.detect_arch(src))
    write.write(write.Target(out, compression=compression, force=force),
                lambda flat: sandbox.add_to(flat, src), extras,
                present=squashfs.read_dir(src / meta.ROOT))
    LOG.info("wrote %s (%s, %s)", out, extras.arch, compression)


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
    stamp = write.source_date_epoch() or int(src.stat().st_mtime)
    with output.atomic_file(out, force) as tmp, output.scratch(out, "sqfs") as part:
        with open(src, "rb") as f_in, open(part, "wb") as f_out:
            f_in.seek(image.offset)
            shutil.copyfileobj(f_in, f_out, 1 << 20)
        write.sif_from_partition(tmp, part, info, write.Extras(sandbox.host_arch()), stamp)
