"""The build record: which layers a SIF capsid built is made of, for ``push docker://``.

A build writes it into the SIF (a JSON object named :data:`NAME`): the base image's
layers (registry digests) or its unpacked files, and the step layers' cache keys. At
push time :func:`layers_of` reads it back and finds those layers in the caches, so the
image is pushed layer by layer, as built, rather than as one flattened layer; it says
None where the caches no longer hold them. The writer and the reader live here, in the
builder, which owns those caches; :mod:`capsid.oci.push` only uploads what it is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsid import log

LOG = log.get(__name__)

#: the SIF object's name
NAME = "capsid-build.json"


@dataclass
class BuiltLayers:
    """An image's layers as the caches hold them: ready to push."""

    config: dict[str, Any]  #: the OCI image config, without its rootfs
    #: the base image's compressed layers: (digest, blob path, media type)
    blobs: list[tuple[str, Path, str]] = field(default_factory=list)
    base_diff_ids: list[str] = field(default_factory=list)  #: the blobs' diff ids
    #: the layers still to compress: each a function giving its tar stream
    trees: list[Callable[[], Iterable[bytes]]] = field(default_factory=list)


def make(config: dict[str, Any], base_layers: list[dict[str, Any]] | None,
         base_rootfs: str | None, base_diff_ids: list[str], steps: list[str]) -> bytes:
    """The record's content."""
    return json.dumps({"config": config, "base": base_layers, "base_rootfs": base_rootfs,
                       "base_diff_ids": base_diff_ids, "steps": steps}).encode()


def layers_of(image: Path) -> BuiltLayers | None:
    """The layers SIF *image* was built from, found in the caches; None where it has no
    record (it was not built by capsid, or is damaged) or they are gone."""
    from capsid.image import sif

    with sif.SifImage(image) as s:
        found = s.find(sif.DataType.GENERIC_JSON, NAME)
        try:
            record = json.loads(s.read(found)) if found else None
        except ValueError:
            record = None
    if not isinstance(record, dict):
        return None
    return _from_caches(record, image.name)


def _tar_of(tree: str) -> Callable[[], Iterable[bytes]]:
    from capsid.build import treetar

    return lambda: treetar.chunks(tree)


def _from_caches(record: dict[str, Any], name: str) -> BuiltLayers | None:
    from capsid.build.store import BuildStore
    from capsid.oci import image as oci
    from capsid.oci.store import Store

    store = Store()
    builds = BuildStore(store.root)
    base, steps = record.get("base"), record.get("steps")
    config = record.get("config")
    rootfs = record.get("base_rootfs")
    if base is None and isinstance(rootfs, str) and os.path.isdir(rootfs) and \
            os.path.realpath(rootfs).startswith(os.path.realpath(builds.bases) + "/"):
        base = []  # the base's files are pushed as the first layer, below the steps'
    else:
        rootfs = None
    if not (isinstance(base, list) and isinstance(steps, list) and isinstance(config, dict)):
        return None
    built = BuiltLayers(config)
    for layer in base:
        digest = str(layer.get("digest", "")) if isinstance(layer, dict) else ""
        if not digest.startswith("sha256:") or not store.has(digest):
            LOG.info("the base layers of %s are no longer cached: pushing one layer", name)
            return None
        media = str(layer.get("mediaType") or "")
        media = (oci.OCI_LAYER_ZSTD if media.endswith("zstd") else oci.OCI_LAYER
                 if media.endswith(".tar") else oci.OCI_LAYER_GZIP)
        built.blobs.append((digest, store.blob_path(digest), media))
    diffs = [builds.get(str(key)) for key in steps]
    if any(layer is None for layer in diffs):
        LOG.info("the build cache no longer holds %s's steps: pushing one layer", name)
        return None
    if rootfs is None:
        built.base_diff_ids = [str(d) for d in record.get("base_diff_ids") or []]
    trees = ([rootfs] if rootfs else []) + [str(layer.diff) for layer in diffs if layer]
    built.trees = [_tar_of(tree) for tree in trees]
    return built
