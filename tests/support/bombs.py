"""Decompression bombs as OCI layouts: a small compressed layer that inflates to gigabytes.

A layer is a tar of one file of zeros, compressed as one gzip member or one zstd frame,
as `gzip` and `zstd` write them. Used by tests/integration/test_hostile.py (1 GiB) and
by scripts/bombs.sh (the sizes of #10: 10 GB gzip, 8 GiB zstd).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

BLOCK = 64 << 20  # zeros fed to the compressor at a time


def bomb_layer(size: int, kind: str, name: str = "zeros") -> bytes:
    """A compressed tar holding *name*: *size* zero bytes."""
    if kind == "gzip":
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    else:
        import zstandard

        compressor = zstandard.ZstdCompressor(level=3).compressobj()
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    out = io.BytesIO()
    out.write(compressor.compress(info.tobuf(tarfile.PAX_FORMAT)))
    left = size + (-size % 512) + 1024  # the data, its padding, the end of the archive
    zeros = bytes(BLOCK)
    while left:
        out.write(compressor.compress(zeros[:min(left, BLOCK)]))
        left -= min(left, BLOCK)
    out.write(compressor.flush())
    return out.getvalue()


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_layout(layout: Path, layers: list[tuple[bytes, str]]) -> None:
    """An OCI layout at *layout* with *layers* (bytes, media type), oldest first."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin:/usr/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{'0' * 64}"] * len(layers)}}
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(layout, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc,
                "layers": [{"mediaType": media, **_blob(layout, data)} for data, media in layers]}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(layout, json.dumps(manifest).encode()),
                     "annotations": {"org.opencontainers.image.ref.name": "bomb"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [manifest_desc]}))


def tar_of(root: Path) -> bytes:
    """An uncompressed tar of directory *root* (the base layer a bomb sits on)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
    return out.getvalue()


MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
         "plain": "application/vnd.oci.image.layer.v1.tar"}
