"""Reading an image's metadata (labels, scripts, def file, environment) without mounting it."""

from __future__ import annotations

import json
from pathlib import Path

from capsid.image import meta, sif, squashfs
from capsid.image.locate import SANDBOX, SQUASHFS, Image


def metadata(image: Image) -> meta.Metadata:
    """The metadata of *image*, read from SIF objects or its ``/.singularity.d``."""
    if image.kind == SANDBOX:
        return meta.Metadata.from_tree(squashfs.read_dir(Path(image.path) / meta.ROOT))
    if image.kind == SQUASHFS:
        return _from_squashfs(image)
    with sif.SifImage(image.path) as f:
        stored = f.find(sif.DataType.GENERIC_JSON, "inspect-metadata.json")
        deffile = f.find(sif.DataType.DEFFILE)
        config = f.find(sif.DataType.GENERIC_JSON, "oci-config.json")
        result = (meta.Metadata.from_inspect_json(f.read(stored)) if stored
                  else _from_squashfs(image))
        if result.deffile is None and deffile is not None:
            result.deffile = f.read(deffile).decode(errors="replace")
        if config is not None:
            try:
                loaded = json.loads(f.read(config))
            except ValueError:
                loaded = None
            result.oci_config = loaded if isinstance(loaded, dict) else None
    return result


def _from_squashfs(image: Image) -> meta.Metadata:
    return meta.Metadata.from_tree(squashfs.read_tree(Path(image.path), "/" + meta.ROOT,
                                                      image.offset))
