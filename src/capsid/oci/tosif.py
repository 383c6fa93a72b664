"""An OCI image (config + layers) → a SIF, in one streaming pass.

Layers are decompressed, flattened newest first (:mod:`capsid.oci.flatten`)
and piped into ``tar2sqfs``; nothing is unpacked on the host and no layer is
held in memory. The image gets Apptainer's ``/.singularity.d``: a runscript
with Docker's ENTRYPOINT/CMD rules, ``env/10-docker2singularity.sh`` from
``Env``, ``labels.json``; the SIF keeps the OCI config as ``oci-config.json``.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from capsid import log
from capsid.errors import ImageFormatError
from capsid.image import meta, output, sif, squashfs
from capsid.image.convert import sif_objects, source_date_epoch
from capsid.oci import compression as comp
from capsid.oci.flatten import Flattener
from capsid.oci.image import Layer, SourceImage, digest_of

LOG = log.get(__name__)

ENV_SCRIPT = "10-docker2singularity.sh"


def _created(config: dict[str, Any]) -> int:
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


def _members(files: dict[str, bytes], stamp: int,
             mode: int = 0o755) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    for rel, data in files.items():
        info = tarfile.TarInfo(f"{meta.ROOT}/{rel}")
        info.mode = 0o644 if rel == "labels.json" else mode
        info.mtime, info.size = stamp, len(data)
        yield info, data


def _skeleton_members(runscript: str, stamp: int) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
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


def _hashing(chunks: Iterator[bytes], hasher: hashlib._Hash) -> Iterator[bytes]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


def _flatten(source: SourceImage, write: Callable[[bytes | memoryview], object],
             generated: dict[str, bytes], stamp: int, verified: bool) -> None:
    """The image's root filesystem as one tar stream: its layers, /.singularity.d."""
    flat = Flattener(write)
    for info, data in _members(generated, stamp):
        flat.add_member(info, data)
    for index, layer in enumerate(reversed(source.layers)):
        chunks, hasher = layer_chunks(layer, verified)
        flat.add_layer(chunks, f"layer {len(source.layers) - index}")
        digest = digest_of(hasher) if hasher is not None else None
        if digest is not None and digest != layer.digest:
            raise ImageFormatError(
                f"layer {layer.digest[:19]}… does not match its digest "
                f"(got {digest[:19]}…)", "the image is damaged; get it again")
    for info, data in _skeleton_members(generated["runscript"].decode(), stamp):
        flat.add_member(info, data)
    flat.finish()


def write_sandbox(source: SourceImage, out: Path, *, force: bool = False,
                  verified: bool = False) -> None:
    """Unpack *source* into sandbox directory *out* (atomically), /.singularity.d made
    as for a SIF: the flattened layers stream into GNU tar, no SIF in between."""
    from capsid.image import untar

    epoch = source_date_epoch()
    stamp = epoch if epoch is not None else _created(source.config)
    generated = generated_files(source)
    with output.atomic_dir(out, force) as tmp:
        tmp.mkdir()
        untar.into(tmp, lambda write: _flatten(source, write, generated, stamp, verified))
        os.chmod(tmp, 0o755)
    LOG.info("unpacked %s into %s (%d layers)", source.name, out, len(source.layers))


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
        key.update(layer.digest.encode())
    key.update(compression.encode())
    return uuid.UUID(bytes=key.digest()[:16], version=4)


def write_sif(source: SourceImage, out: Path, *, compression: str = "zstd",
              force: bool = False, verified: bool = False,
              extra: dict[str, bytes] | None = None,
              objects: list[sif.NewObject] | None = None) -> None:
    """Convert *source* into SIF *out* (atomically).

    With *verified* the layers are trusted to match their digests (the cache
    checked them while downloading); otherwise each is hashed as it streams.
    *objects* are more SIF objects to store (before the standard ones).
    *extra* (paths relative to ``/.singularity.d``) replace or add to what is made
    from the OCI config: a definition file's runscript, environment and labels.
    """
    squashfs.check_compression(compression)
    epoch = source_date_epoch()
    stamp = epoch if epoch is not None else _created(source.config)
    generated = {**generated_files(source), **(extra or {})}
    runscript = generated["runscript"].decode()
    with output.atomic_file(out, force) as tmp, output.scratch(out, "sqfs") as part:
        with squashfs.writer(part, compression) as pipe:
            _flatten(source, pipe.write, generated, stamp, verified)
        files: dict[str, bytes | str] = {
            rel[len(meta.ROOT) + 1:]: content
            for rel, (_mode, content) in meta.skeleton(runscript).items()
            if rel.startswith(meta.ROOT + "/") and content is not None
        }
        files.update(generated)
        metadata = meta.Metadata.from_tree(files)
        oci_config = json.dumps(source.config.get("config") or {},
                                separators=(",", ":")).encode()
        arch = source.architecture
        objs = [*(objects or []), *sif_objects(metadata, part, arch, oci_config)]
        image_id = _image_id(source, compression)
        if sif.write_in_place(part, objs, created_at=stamp, image_id=image_id):
            os.replace(part, tmp)  # the squashfs became the SIF: no copy of it
        else:
            with open(tmp, "wb") as f:
                sif.write(f, objs, created_at=stamp, image_id=image_id)
    LOG.info("wrote %s (%s, %d layers, %s)", out, source.architecture, len(source.layers),
             compression)
