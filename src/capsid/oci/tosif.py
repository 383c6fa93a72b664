"""An OCI image (config + layers) → a SIF or a sandbox, in one streaming pass.

Layers are decompressed and flattened newest first (:mod:`capsid.image.flatten`)
into the image writer (:mod:`capsid.image.write`); nothing is unpacked on the host
on the way to a SIF and no layer is held in memory. The image gets Apptainer's
``/.singularity.d``: a runscript with Docker's ENTRYPOINT/CMD rules,
``env/10-docker2singularity.sh`` from ``Env``, ``labels.json``; the SIF keeps the OCI
config as ``oci-config.json``.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsid import log
from capsid.errors import ImageFormatError
from capsid.image import meta, sif, write
from capsid.image.flatten import Flattener
from capsid.oci import compression as comp
from capsid.oci.image import Layer, SourceImage, digest_of

LOG = log.get(__name__)

ENV_SCRIPT = "10-docker2singularity.sh"


def created(config: dict[str, Any]) -> int:
    """The image's creation time as Unix seconds (0 if absent or unreadable)."""
    text = str(config.get("created") or "")
    try:
        stamp = time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return 0
    return max(0, calendar.timegm(stamp))


def generated_files(source: SourceImage) -> dict[str, bytes]:
    """The ``/.singularity.d`` files made from the OCI config (relative to it)."""
    cfg = source.config.get("config") or {}
    entrypoint = [str(a) for a in cfg.get("Entrypoint") or []]
    cmd = [str(a) for a in cfg.get("Cmd") or []]
    env = [str(e) for e in cfg.get("Env") or []]
    labels = {str(k): str(v) for k, v in (cfg.get("Labels") or {}).items()}
    return {
        "runscript": meta.oci_runscript(entrypoint, cmd).encode(),
        f"env/{ENV_SCRIPT}": meta.docker_env_script(env).encode(),
        "labels.json": meta.labels_json(labels),
        "Singularity": deffile(source).encode(),
    }


def deffile(source: SourceImage) -> str:
    bootstrap, _, ref = source.name.partition("://")
    if not ref:
        bootstrap, _, ref = source.name.partition(":")
    return f"bootstrap: {bootstrap}\nfrom: {ref}\n"


def _hashing(chunks: Iterator[bytes], hasher: hashlib._Hash) -> Iterator[bytes]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


def layer_chunks(layer: Layer,
                  verified: bool) -> tuple[Iterator[bytes], hashlib._Hash | None]:
    """Decompressed chunks of *layer*, and the hash to compare afterwards (or None).

    Reading, hashing and decompressing run in a thread ahead of the flattener.
    """
    f = layer.opener()
    hasher = None if verified else hashlib.sha256()
    if layer.verify_uncompressed and hasher is not None:
        produced = _hashing(comp.decompressed(f), hasher)
    else:
        produced = comp.decompressed(f, hasher)

    def closing() -> Iterator[bytes]:
        try:
            yield from comp.ahead(produced)
        finally:
            f.close()
    return closing(), hasher


def _image_id(source: SourceImage, compression: str) -> uuid.UUID:
    """A SIF ID determined by the image's content (config and layer digests)."""
    key = hashlib.sha256(source.config_raw or json.dumps(source.config).encode())
    for layer in source.layers:
        key.update(layer.key.encode())
    key.update(compression.encode())
    return uuid.UUID(bytes=key.digest()[:16], version=4)


def add_layers(flat: Flattener, layers: list[Layer], verified: bool) -> None:
    """Add *layers* (oldest first) to *flat*, newest first, checking each against its
    digest unless *verified* (or made here, without one)."""
    for index, layer in enumerate(reversed(layers)):
        chunks, hasher = layer_chunks(layer, verified or layer.digest is None)
        flat.add_layer(chunks, f"layer {len(layers) - index}")
        digest = digest_of(hasher) if hasher is not None else None
        if digest is not None and digest != layer.digest:
            raise ImageFormatError(
                f"layer {layer.key[:19]}… does not match its digest "
                f"(got {digest[:19]}…)", "the image is damaged; get it again")


def write_image(source: SourceImage, out: Path, *, sandbox: bool = False,
                compression: str = "zstd", force: bool = False, verified: bool = False,
                owners: bool = False, extra: dict[str, bytes] | None = None,
                objects: list[sif.NewObject] | None = None,
                lower: tuple[Path, int, int] | None = None) -> None:
    """Convert *source* into SIF or sandbox directory *out* (atomically).

    With *verified* the layers are trusted to match their digests (the cache
    checked them while downloading); otherwise each is hashed as it streams.
    *objects* are more SIF objects to store (before the standard ones).
    *extra* (paths relative to ``/.singularity.d``) replace or add to what is made
    from the OCI config: a definition file's runscript, environment and labels.
    *owners*: a sandbox keeps the image's owners (a build with mapped ids).
    *lower*: (file, offset, count): the squashfs in *file* at *offset* already holds
    the oldest *count* layers (a build's base, as a SIF of it made): the rest is laid
    over it (see :mod:`capsid.image.sqmerge`).
    """
    oci_config = json.dumps(source.config.get("config") or {},
                            separators=(",", ":")).encode()
    extras = write.Extras(source.architecture, objects or [], oci_config,
                          _image_id(source, compression))
    layers, below = source.layers, None
    if lower is not None:
        held = source.layers[:lower[2]]
        layers = source.layers[lower[2]:]
        below = write.Lower(lower[0], lower[1], lambda flat: add_layers(flat, held, verified))
    write.write(write.Target(out, sandbox, compression, force, owners),
                lambda flat: add_layers(flat, layers, verified), extras, lower=below,
                stamp=created(source.config),
                generated={**generated_files(source), **(extra or {})})
    LOG.info("wrote %s (%s, %d layers%s)", out, source.architecture, len(source.layers),
             "" if sandbox else f", {compression}")


def write_sif(source: SourceImage, out: Path, *, compression: str = "zstd",
              force: bool = False, verified: bool = False) -> None:
    """:func:`write_image` of a SIF."""
    write_image(source, out, compression=compression, force=force, verified=verified)


def write_sandbox(source: SourceImage, out: Path, *, force: bool = False,
                  verified: bool = False) -> None:
    """:func:`write_image` of a sandbox directory: no SIF in between."""
    write_image(source, out, sandbox=True, force=force, verified=verified)
