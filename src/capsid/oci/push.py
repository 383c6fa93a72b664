"""Uploading SIFs: as an ORAS artifact (Apptainer's way) or as a runnable OCI image.

``oras://`` stores the SIF file itself as the single layer of an OCI manifest,
with Apptainer's media types, so ``apptainer pull oras://`` and ``capsid pull
oras://`` get the same bytes back. ``docker://`` turns the SIF's root
filesystem into one gzip tar layer plus an image config (the SIF's own OCI
config when it came from one), which Docker, Podman and skopeo understand.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from capsid import log, tools
from capsid.errors import ImageFormatError
from capsid.image import sif
from capsid.image.locate import SIF, locate
from capsid.image.stock import DEFAULT_PATH
from capsid.oci import image as oci
from capsid.oci.image import digest_of, sha256_digest
from capsid.oci.reference import Reference
from capsid.oci.registries import Endpoint
from capsid.oci.registry import Client, file_chunks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.build.record import BuiltLayers

LOG = log.get(__name__)


def _file_digest(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
            size += len(block)
    return digest_of(hasher), size


def _descriptor(media_type: str, data_digest: str, size: int,
                annotations: dict[str, str] | None = None) -> dict[str, Any]:
    desc: dict[str, Any] = {"mediaType": media_type, "digest": data_digest, "size": size}
    if annotations:
        desc["annotations"] = annotations
    return desc


def _manifest(config: dict[str, Any], layers: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": config,
                       "layers": layers}, separators=(",", ":")).encode()


def push_oras(client: Client, image: Path, ref: Reference, insecure: bool) -> str:
    """Upload SIF *image* as an ORAS artifact; return the manifest digest."""
    if locate(image).kind != SIF:
        raise ImageFormatError(f"{image} is not a SIF file",
                               f"build one first: capsid build IMAGE.sif {image}")
    ep = Endpoint(ref, insecure)
    digest, size = _file_digest(image)
    client.upload_blob(ep, digest, size, file_chunks(image))
    config = b"{}"
    config_digest = sha256_digest(config)
    client.upload_blob(ep, config_digest, len(config), lambda: config)
    raw = _manifest(_descriptor(oci.SIF_CONFIG, config_digest, len(config)),
                    [_descriptor(oci.SIF_LAYER, digest, size, {oci.TITLE: image.name})])
    client.put_manifest(ep, raw, oci.OCI_MANIFEST)
    return sha256_digest(raw)


def _layer_from_sif(image: Path, work: Path) -> tuple[Path, str, str, int]:
    """(gzip layer file, its digest, uncompressed diff ID, size) of the SIF's root fs."""
    found = locate(image)
    part = work / "root.sqfs"
    with open(image, "rb") as src, open(part, "wb") as dst:
        src.seek(found.offset)
        remaining = found.size or (os.fstat(src.fileno()).st_size - found.offset)
        while remaining:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if not copied:
                break
            remaining -= copied
    layer = work / "layer.tar.gz"
    with tools.reading(["sqfs2tar", "--no-skip", str(part)]) as tar:
        digest, diff_id = _gzip_layer(iter(lambda: tar.read(1 << 20), b""), layer)
    part.unlink()
    return layer, digest, diff_id, layer.stat().st_size


def _gzip_layer(chunks: Iterable[bytes], layer: Path) -> tuple[str, str]:
    """Write tar *chunks* gzipped to *layer*: (its digest, the uncompressed diff ID)."""
    diff, digest = hashlib.sha256(), hashlib.sha256()
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
    with open(layer, "wb") as out:
        for block in chunks:
            diff.update(block)
            packed = deflate.compress(block)
            digest.update(packed)
            out.write(packed)
        packed = deflate.flush()
        digest.update(packed)
        out.write(packed)
    return digest_of(digest), digest_of(diff)


def push_docker(client: Client, image: Path, ref: Reference, insecure: bool,
                built: BuiltLayers | None = None) -> str:
    """Upload SIF *image* as an OCI image; return the manifest digest.

    An image capsid built keeps its layers (the base image's, then one per step) when
    the builder found them in its caches (*built*); any other SIF becomes one layer.
    """
    if locate(image).kind != SIF:
        raise ImageFormatError(f"{image} is not a SIF file",
                               f"build one first: capsid build IMAGE.sif {image}")
    with sif.SifImage(image) as s:
        arch = s.header.arch
        created = s.header.created_at
        found = s.find(sif.DataType.GENERIC_JSON, "oci-config.json")
        try:
            oci_config = json.loads(s.read(found)) if found else None
        except ValueError:  # a damaged object: push with the defaults
            oci_config = None
    if built is not None:
        return _push_layers(client, built, Endpoint(ref, insecure))
    if not isinstance(oci_config, dict) or not oci_config:
        oci_config = {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["/.singularity.d/runscript"]}
    ep = Endpoint(ref, insecure)
    with tempfile.TemporaryDirectory(prefix="capsid-push-") as tmp:
        layer, digest, diff_id, size = _layer_from_sif(image, Path(tmp))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(created, 0)))
        config = json.dumps({
            "created": stamp, "architecture": arch if arch != "unknown" else "amd64",
            "os": "linux", "config": oci_config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": stamp, "created_by": f"capsid push {image.name}"}],
        }, separators=(",", ":"), sort_keys=True).encode()
        config_digest = sha256_digest(config)
        client.upload_blob(ep, digest, size, file_chunks(layer))
        client.upload_blob(ep, config_digest, len(config), lambda: config)
    raw = _manifest(_descriptor(oci.OCI_CONFIG, config_digest, len(config)),
                    [_descriptor(oci.OCI_LAYER_GZIP, digest, size)])
    client.put_manifest(ep, raw, oci.OCI_MANIFEST)
    return sha256_digest(raw)



def _push_layers(client: Client, built: BuiltLayers, ep: Endpoint) -> str:
    """Push an image capsid built layer by layer, as the caches hold them."""
    descriptors = []
    for digest, path, media in built.blobs:
        size = path.stat().st_size
        client.upload_blob(ep, digest, size, file_chunks(path))
        descriptors.append(_descriptor(media, digest, size))
    diff_ids = list(built.base_diff_ids)
    config = built.config
    with tempfile.TemporaryDirectory(prefix="capsid-push-") as tmp:
        for index, tree in enumerate(built.trees):
            path = Path(tmp) / f"layer{index}.tar.gz"
            digest, diff_id = _gzip_layer(tree(), path)
            size = path.stat().st_size
            client.upload_blob(ep, digest, size, file_chunks(path))
            descriptors.append(_descriptor(oci.OCI_LAYER_GZIP, digest, size))
            diff_ids.append(diff_id)
    full = {**config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    raw_config = json.dumps(full, separators=(",", ":"), sort_keys=True).encode()
    config_digest = sha256_digest(raw_config)
    client.upload_blob(ep, config_digest, len(raw_config), lambda: raw_config)
    raw = _manifest(_descriptor(oci.OCI_CONFIG, config_digest, len(raw_config)), descriptors)
    client.put_manifest(ep, raw, oci.OCI_MANIFEST)
    return sha256_digest(raw)
