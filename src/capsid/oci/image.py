"""OCI image manifests and indexes: media types, platform choice, the parts of an image.

Every source (a registry, ``docker save`` archives, OCI archives and layouts)
ends as a :class:`SourceImage`: its config and its layers, each a function that
opens the layer's bytes plus the digest those bytes must have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from capsid import arch as machines
from capsid.errors import CapsidError, ImageFormatError

#: Opens a layer's bytes for reading.
Opener = Callable[[], BinaryIO]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
TITLE = "org.opencontainers.image.title"

INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))



def sha256_digest(data: bytes) -> str:
    """The OCI digest (``sha256:…``) of *data*."""
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(hasher: Any) -> str:
    """The OCI digest of what a sha256 *hasher* has seen."""
    return "sha256:" + str(hasher.hexdigest())


def host_platform() -> tuple[str, str]:
    """(architecture, variant) of this machine in OCI terms."""
    return machines.host() or (os.uname().machine, "")


def parse_platform(arch: str | None) -> tuple[str, str]:
    """``--arch`` (``arm64``, ``arm64/v8``, ``linux/arm/v7``) → (architecture, variant)."""
    if not arch:
        return host_platform()
    parts = arch.strip("/").split("/")
    if parts[0] == "linux":
        parts = parts[1:]
    if not parts or not parts[0]:
        raise CapsidError(f"--arch {arch!r} names no architecture",
                          "use e.g. --arch amd64, --arch arm64 or --arch arm/v7")
    known = machines.TABLE.get(parts[0])  # x86_64 is amd64
    architecture = known.oci if known else parts[0]
    default = machines.BY_OCI.get(architecture)
    variant = parts[1] if len(parts) > 1 else default.variant if default else ""
    return architecture, variant


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise ImageFormatError(f"the {what} is not valid JSON",
                               "the image is damaged; pull or save it again") from None
    if not isinstance(value, dict):
        raise ImageFormatError(f"the {what} is not a JSON object",
                               "the image is damaged; pull or save it again")
    return dict(value)


def _bad(what: str, field: str, wanted: str) -> ImageFormatError:
    return ImageFormatError(f"the {what}'s {field} is not {wanted}",
                            "the image is damaged or hostile; pull or save it again")


def strings(value: object) -> bool:
    """Whether *value* is a JSON list of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _labels(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _text(value: object) -> bool:
    return isinstance(value, str)


def _object(value: object) -> bool:
    return isinstance(value, dict)


#: Fields of an image config's "config": the check of its JSON shape, and its name.
_RUN_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "Env": (strings, "a list of strings"), "Entrypoint": (strings, "a list of strings"),
    "Cmd": (strings, "a list of strings"), "Labels": (_labels, "an object of strings"),
    "WorkingDir": (_text, "a string"), "User": (_text, "a string"),
    "StopSignal": (_text, "a string"), "ExposedPorts": (_object, "an object"),
    "Volumes": (_object, "an object"),
}


def image_config(raw: bytes) -> dict[str, Any]:
    """An image config, with every field capsid reads checked for its JSON type."""
    what = "image config"
    config = load_json(raw, what)
    for key in ("architecture", "os", "created", "variant"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise _bad(what, key, "a string")
    run = config.get("config")
    if run is not None and not isinstance(run, dict):
        raise _bad(what, '"config"', "an object")
    for key, (check, wanted) in _RUN_FIELDS.items():
        value = (run or {}).get(key)
        if value is not None and not check(value):
            raise _bad(what, key, wanted)
    rootfs = config.get("rootfs")
    if rootfs is not None and not (isinstance(rootfs, dict)
                                   and strings(rootfs.get("diff_ids") or [])):
        raise _bad(what, "rootfs", 'an object with a list of "diff_ids"')
    return config


def media_type(doc: dict[str, Any], fallback: str = "") -> str:
    value = doc.get("mediaType") or fallback
    if not value and "manifests" in doc:
        return OCI_INDEX
    if not value and "layers" in doc:
        return OCI_MANIFEST
    return str(value)


def index_entries(index: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The descriptors an image index lists (entries that are not objects are left out)."""
    value = index.get("manifests")
    if value is None:
        return []
    if not isinstance(value, list):
        raise ImageFormatError(f"the index of {name} has a 'manifests' that is not a list",
                               "the image is damaged or hostile; pull or save it again")
    return [d for d in value if isinstance(d, dict)]


def _platform_of(desc: dict[str, Any]) -> dict[str, str]:
    value = desc.get("platform")
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(v, str)}


def choose_platform(index: dict[str, Any], platform: tuple[str, str], name: str) -> dict[str, Any]:
    """The descriptor in *index* for *platform*; a clear error listing what there is."""
    arch, variant = platform
    entries = index_entries(index, name)
    candidates = []
    for desc in entries:
        p = _platform_of(desc)
        if p.get("os", "linux") != "linux" or p.get("architecture") != arch:
            continue
        candidates.append((desc, p.get("variant", "")))
    for desc, var in candidates:
        if var == variant or (not var and variant in ("", "v8")):
            return dict(desc)
    if len(candidates) == 1 or (candidates and not variant):
        return dict(candidates[0][0])
    available = sorted({"/".join(x for x in (_platform_of(d).get("architecture", "?"),
                                              _platform_of(d).get("variant", "")) if x)
                        for d in entries})
    wanted = f"{arch}/{variant}" if variant else arch
    raise CapsidError(f"{name} has no image for linux/{wanted}",
                      f"it has: {', '.join(available) or 'none'}; choose one with --arch")


def check_platform(config: dict[str, Any], platform: tuple[str, str], name: str) -> None:
    """An image of one architecture (no index to choose from) against the one asked for:
    another than the one asked for is an error; another than this machine's, when none
    was asked for, a warning (it runs only under emulation)."""
    found, wanted = str(config.get("architecture") or ""), platform[0]
    known = machines.TABLE.get(found)  # x86_64 is amd64
    if not found or (known.oci if known else found) == wanted:
        return
    if platform == host_platform():
        from capsid import log

        log.get(__name__).warning("%s is an image for linux/%s, not for this machine "
                                  "(linux/%s): it runs only under emulation", name, found,
                                  wanted)
        return
    raise CapsidError(f"{name} is an image for linux/{found} only, not for linux/{wanted}",
                      f"drop --arch {wanted} for that image, or use one made for "
                      f"linux/{wanted}")


class Layer:
    """One layer: how to open its bytes, and the digest they must hash to.

    A layer made here (a build step's directory, a base read back from its files) has
    no digest until it is written: *digest* is None and *key* names its content.
    """

    __slots__ = ("digest", "key", "media_type", "opener", "size", "verify_uncompressed")

    def __init__(self, digest: str | None, size: int, media_type: str,
                 opener: Opener, verify_uncompressed: bool = False,
                 key: str | None = None) -> None:
        self.digest = digest
        self.size = size
        self.media_type = media_type
        self.opener = opener
        #: True when *digest* is of the uncompressed tar (a docker-save diff ID).
        self.verify_uncompressed = verify_uncompressed
        #: what identifies the content: the digest, or the maker's key
        self.key = key or digest or ""


class SourceImage:
    """An image ready to convert: config and layers (oldest first)."""

    def __init__(self, name: str, config: dict[str, Any], layers: list[Layer],
                 manifest_digest: str | None = None, config_raw: bytes = b"") -> None:
        self.name = name
        self.config = config
        self.layers = layers
        self.manifest_digest = manifest_digest
        self.config_raw = config_raw

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture") or host_platform()[0])

    def identity(self) -> str:
        """A digest naming this image's content: its manifest's, or (a ``docker save``
        archive has none) one of its config and its layers' digests, which the
        conversion checks each layer against."""
        if self.manifest_digest:
            return self.manifest_digest
        import hashlib

        key = hashlib.sha256(self.config_raw)
        for layer in self.layers:
            key.update(b"\0" + layer.key.encode())
        return f"sha256:{key.hexdigest()}"


def manifest_parts(manifest: dict[str, Any],
                   name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config descriptor, layer descriptors) of an image manifest."""
    kind = media_type(manifest)
    if kind in DOCKER_SCHEMA1 or manifest.get("schemaVersion") == 1:
        raise CapsidError(f"{name} uses Docker's schema 1 manifest, which capsid does not read",
                          "push the image again with a current Docker, Podman or skopeo")
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise ImageFormatError(f"the manifest of {name} has no config or layers",
                               "the image is damaged or not a container image")
    for desc in [config, *layers]:
        if not (isinstance(desc, dict) and isinstance(desc.get("digest"), str)
                and isinstance(desc.get("size", 0), int)
                and isinstance(desc.get("mediaType", ""), str)):
            raise ImageFormatError(f"the manifest of {name} has a descriptor without a "
                                   "digest string and a size number",
                                   "the image is damaged or hostile; pull or save it again")
    return config, layers
