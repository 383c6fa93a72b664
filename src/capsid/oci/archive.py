"""Images in files: ``docker save`` archives, OCI archives and OCI layout directories.

An archive is never unpacked: its tar index is read once and each member is
read in place, from its offset in the archive. Both ``docker save`` formats are
read: the legacy one (``manifest.json`` with ``<id>/layer.tar``) and the
OCI-based one of Docker 25 and later (also ``manifest.json``, with layers under
``blobs/sha256``), as are podman's and buildah's.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from capsid.errors import CapsidError, ImageFormatError, ImageNotFoundError
from capsid.oci import image as oci
from capsid.oci.image import sha256_digest
from capsid.oci.store import REF_ANNOTATION, check_digest


class _Slice(io.RawIOBase):
    """A read-only window [offset, offset+size) of a file."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._f.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class Files:
    """Read access to named files in a directory or (in place) in a tar archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, tuple[int, int]] | None = None
        if path.is_dir():
            return
        from capsid.image.locate import open_file

        try:
            with open(open_file(str(path), "archive"), "rb") as f, \
                    tarfile.open(fileobj=f, mode="r:") as tar:
                members = {m.name.lstrip("./") if m.name.startswith("./") else m.name: m
                           for m in tar.getmembers()}
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ImageFormatError(f"{path} is not a tar archive ({e})",
                                   "give a file made by 'docker save', 'podman save' or "
                                   "'skopeo copy … oci-archive:'") from None
        self._members = {}
        for name, m in members.items():
            target: tarfile.TarInfo | None = m
            for _ in range(8):  # docker save links repeated layers
                if target is None or not (target.issym() or target.islnk()):
                    break
                link = target.linkname if target.islnk() else \
                    os.path.normpath(os.path.join(os.path.dirname(target.name), target.linkname))
                target = members.get(link.lstrip("./") if link.startswith("./") else link)
                if target is None:
                    break
            if target is not None and target.isreg():
                self._members[name] = (target.offset_data, target.size)

    def exists(self, name: str) -> bool:
        if self._members is None:
            return (self.path / name).is_file()
        return name in self._members

    def open(self, name: str) -> BinaryIO:
        if self._members is None:
            full = (self.path / name).resolve()
            if not full.is_relative_to(self.path.resolve()) or not full.is_file():
                raise self._missing(name)
            return open(full, "rb")
        if name not in self._members:
            raise self._missing(name)
        offset, size = self._members[name]
        return io.BufferedReader(_Slice(str(self.path), offset, size), 1 << 20)

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def _missing(self, name: str) -> ImageFormatError:
        return ImageFormatError(f"{self.path} has no {name}",
                                "the archive or layout is incomplete; save it again")


def split_ref(spec: str) -> tuple[Path, str | None]:
    """``PATH[:TAG]`` → (path, tag); a colon is part of the path if that path exists."""
    if os.path.exists(spec) or ":" not in spec:
        return Path(spec), None
    path, _, tag = spec.rpartition(":")
    if not os.path.exists(path) and ":" in path:  # docker-archive:x.tar:repo:tag
        first, _, rest = path.partition(":")
        if os.path.exists(first):
            return Path(first), f"{rest}:{tag}"
    return Path(path), tag or None


def _exists(path: Path, scheme: str) -> None:
    if not path.exists():
        raise ImageNotFoundError(f"{scheme}{path} does not exist",
                                 "check the path of the archive or layout")


# -- OCI layouts (directories and archives) ----------------------------------------------


def _blob_name(digest: str) -> str:
    return "blobs/" + check_digest(digest).replace(":", "/", 1)


def _blob_opener(files: Files, digest: str) -> oci.Opener:
    return lambda: files.open(_blob_name(digest))


def oci_layout(spec: str, platform: tuple[str, str], scheme: str = "oci:") -> oci.SourceImage:
    """The image in an OCI layout directory or ``oci-archive`` (``PATH[:TAG]``)."""
    path, tag = split_ref(spec)
    _exists(path, scheme)
    files = Files(path)
    if not files.exists("index.json"):
        raise ImageFormatError(f"{path} is not an OCI image layout (no index.json)",
                               "give a directory or archive written by skopeo, buildah or umoci")
    index = oci.load_json(files.read("index.json"), "OCI index")
    entries = oci.index_entries(index, str(path))
    if tag:
        names = {tag}
        if ":" not in tag:
            names.add(f"{tag}:latest")
        chosen = [d for d in entries
                  if _annotation(d, REF_ANNOTATION) in names
                  or _annotation(d, "io.containerd.image.name").endswith(f"/{tag}")]
        if not chosen:
            refs = sorted(_annotation(d, REF_ANNOTATION) or "None" for d in entries)
            raise ImageNotFoundError(f"{path} has no image tagged {tag!r}",
                                     f"it has: {', '.join(refs) or 'no tags'}")
        desc = chosen[0]
    elif len(entries) == 1:
        desc = entries[0]
    elif not entries:
        raise ImageFormatError(f"{path} holds no image", "save or copy an image into it first")
    else:
        try:
            desc = oci.choose_platform({"manifests": entries}, platform, str(path))
        except CapsidError:
            raise CapsidError(f"{path} holds {len(entries)} images",
                              f"name one: {scheme}{path}:TAG") from None
    return _from_descriptor(files, desc, platform, f"{scheme}{spec}")


def _annotation(desc: dict[str, Any], key: str) -> str:
    value = desc.get("annotations")
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, str) else ""


def _from_descriptor(files: Files, desc: dict[str, Any], platform: tuple[str, str],
                     name: str) -> oci.SourceImage:
    chosen = False  # from an index, for the platform
    for _ in range(4):
        digest = str(desc.get("digest", ""))
        raw = _verified(files, digest)
        doc = oci.load_json(raw, "manifest")
        if oci.media_type(doc, str(desc.get("mediaType", ""))) in oci.INDEXES:
            desc, chosen = oci.choose_platform(doc, platform, name), True
            continue
        config_desc, layer_descs = oci.manifest_parts(doc, name)
        config_raw = _verified(files, str(config_desc.get("digest", "")))
        layers = [oci.Layer(str(d["digest"]), int(d.get("size", 0)),
                            str(d.get("mediaType", "")), _blob_opener(files, str(d["digest"])))
                  for d in layer_descs]
        config = oci.image_config(config_raw)
        if not chosen:
            oci.check_platform(config, platform, name)
        return oci.SourceImage(name, config, layers, digest, config_raw)
    raise ImageFormatError(f"{name}: indexes nested too deeply", "the layout is damaged")


def _verified(files: Files, digest: str) -> bytes:

    data = files.read(_blob_name(digest))
    if sha256_digest(data) != digest:
        raise ImageFormatError(f"blob {digest[:19]}… does not match its digest",
                               "the archive or layout is damaged; save it again")
    return data


# -- docker save ------------------------------------------------------------------------------


def docker_archive(spec: str, platform: tuple[str, str]) -> oci.SourceImage:
    """The image in a ``docker save`` / ``podman save`` archive (``PATH[:REPO:TAG]``)."""
    path, tag = split_ref(spec)
    _exists(path, "docker-archive:")
    files = Files(path)
    if not files.exists("manifest.json"):
        if files.exists("index.json"):
            return oci_layout(spec, platform, "docker-archive:")
        raise ImageFormatError(f"{path} is not a docker save archive (no manifest.json)",
                               "make it with 'docker save IMAGE -o FILE.tar'")
    import json

    try:
        entries = json.loads(files.read("manifest.json"))
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not entries:
        raise ImageFormatError(f"{path}: manifest.json lists no image", "save the image again")
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("Config"), str)
                and oci.strings(e.get("Layers")) and oci.strings(e.get("RepoTags") or [])):
            raise ImageFormatError(f"{path}: manifest.json has an entry that is not an object "
                                   'with "Config" and "Layers"', "save the image again")
    entry = entries[0]
    if tag:
        wanted = {tag, f"{tag}:latest", f"docker.io/library/{tag}", f"localhost/{tag}"}
        matches = [e for e in entries if set(e.get("RepoTags") or []) & wanted
                   or any(t.endswith(f"/{tag}") for t in e.get("RepoTags") or [])]
        if not matches:
            raise ImageNotFoundError(f"{path} has no image tagged {tag!r}",
                                     "list its tags with 'tar -xOf FILE manifest.json'")
        entry = matches[0]
    elif len(entries) > 1:
        tags = [t for e in entries for t in e.get("RepoTags") or []]
        raise CapsidError(f"{path} holds {len(entries)} images",
                          f"name one: docker-archive:{path}:{tags[0] if tags else 'REPO:TAG'}")
    config_raw = files.read(str(entry.get("Config", "")))
    config = oci.image_config(config_raw)
    oci.check_platform(config, platform, f"docker-archive:{spec}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    layer_paths = [str(p) for p in entry.get("Layers") or []]
    if len(diff_ids) != len(layer_paths):
        raise ImageFormatError(f"{path}: the config lists {len(diff_ids)} layers, the archive "
                               f"{len(layer_paths)}", "save the image again")
    layers = []
    for layer_path, diff_id in zip(layer_paths, diff_ids, strict=True):
        parts = layer_path.split("/")
        if len(parts) == 3 and parts[0] == "blobs":
            layers.append(oci.Layer(f"{parts[1]}:{parts[2]}", 0, "",
                                    _member_opener(files, layer_path)))
        else:
            layers.append(oci.Layer(str(diff_id), 0, "", _member_opener(files, layer_path),
                                    verify_uncompressed=True))
    return oci.SourceImage(f"docker-archive:{spec}", config, layers, None, config_raw)


def _member_opener(files: Files, name: str) -> oci.Opener:
    return lambda: files.open(name)
