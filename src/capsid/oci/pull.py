"""From a reference to a cached, verified image and a SIF made from it.

``resolve`` walks the endpoints (mirrors first) to the platform's manifest,
``fetch`` downloads what the cache lacks (layers in parallel) and
``cached_sif`` converts once per manifest digest, under a lock, so a second
``capsid exec docker://…`` — or the other 31 ranks of a job — find it ready.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from capsid import log
from capsid.errors import CapsidError, ImageNotFoundError
from capsid.oci import image as oci
from capsid.oci.reference import Reference
from capsid.oci.registries import Endpoint, Registries
from capsid.oci.registry import ATTEMPTS, Client, RegistryError, UnreachableError
from capsid.oci.store import Store, check_digest

LOG = log.get(__name__)
PARALLEL_DOWNLOADS = 4


class Progress:
    """A one-line byte counter on stderr, only when it is a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self.enabled = sys.stderr.isatty() and log.enabled(log.NORMAL) and total > 0
        self.total, self.done, self.label = total, 0, label
        self._lock = threading.Lock()
        self._shown = 0.0

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._shown < 0.1 and self.done < self.total:
                return
            self._shown = now
            mib = 1 << 20
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done / mib:.1f}/{self.total / mib:.1f} MiB")
            sys.stderr.flush()

    def end(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


class Resolved:
    """A manifest found at one endpoint."""

    def __init__(self, ref: Reference, endpoint: Endpoint, manifest: dict[str, Any],
                 digest: str) -> None:
        self.ref = ref
        self.endpoint = endpoint
        self.manifest = manifest
        self.digest = digest


class Puller:
    """Resolve, download and convert images from registries."""

    def __init__(self, store: Store | None = None, *, nohttps: bool = False,
                 registries: Registries | None = None) -> None:
        self.store = (store or Store()).prepare()
        self.nohttps = nohttps
        self.registries = registries or Registries.load()
        self.client = Client()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Puller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifests -------------------------------------------------------------------------

    def resolve(self, ref: Reference, platform: tuple[str, str]) -> Resolved:
        """The platform's image manifest for *ref*, trying mirrors first."""
        errors: list[CapsidError] = []
        unreachable = True
        missing_on: list[str] = []  # mirrors that answered "not found"
        for ep in self.registries.endpoints(ref, self.nohttps):
            # after a mirror said "not found", the registry itself is a last resort, tried
            # briefly (offline, it would otherwise take half a minute to fail)
            self.client.attempts = 2 if missing_on and not ep.mirror else ATTEMPTS
            try:
                return self._resolve_at(ref, ep, platform)
            except (RegistryError, ImageNotFoundError) as e:
                if ep.mirror:
                    LOG.info("mirror %s: %s", ep.ref.registry, e.message)
                    if isinstance(e, ImageNotFoundError):
                        missing_on.append(ep.ref.registry)
                unreachable = unreachable and isinstance(e, UnreachableError)
                errors.append(e)
            finally:
                self.client.attempts = ATTEMPTS
        cached = self.store.lookup(str(ref))
        if cached and unreachable:
            LOG.warning("%s is unreachable; using the cached %s", ref.registry, cached[:19])
            return self._from_cache(ref, cached, platform)
        if missing_on and isinstance(errors[-1], UnreachableError):
            raise ImageNotFoundError(
                f"{ref}: the mirror {', '.join(missing_on)} answered that it has no such "
                f"image, and {ref.registry} could not be reached ({errors[-1].message})",
                "check the name and tag, or ask for the image on the mirror")
        raise errors[-1]

    def _resolve_at(self, ref: Reference, ep: Endpoint, platform: tuple[str, str]) -> Resolved:
        raw, media, digest = self.client.manifest(ep, ep.ref.target)
        doc = oci.load_json(raw, "manifest")
        top_digest, top_media = digest, oci.media_type(doc, media)
        self.store.put(raw)
        if top_media in oci.INDEXES:
            desc = oci.choose_platform(doc, platform, str(ref))
            raw, media, digest = self.client.manifest(ep, str(desc["digest"]))
            doc = oci.load_json(raw, "manifest")
            self.store.put(raw)
        self.store.tag(str(ref), top_digest, top_media, len(raw))
        return Resolved(ref, ep, doc, digest)

    def _from_cache(self, ref: Reference, digest: str, platform: tuple[str, str]) -> Resolved:
        doc = oci.load_json(self.store.read(digest), "manifest")
        if oci.media_type(doc) in oci.INDEXES:
            digest = str(oci.choose_platform(doc, platform, str(ref))["digest"])
            doc = oci.load_json(self.store.read(digest), "manifest")
        ep = Endpoint(ref, self.nohttps)
        return Resolved(ref, ep, doc, digest)

    # -- blobs -----------------------------------------------------------------------------

    def fetch(self, resolved: Resolved) -> oci.SourceImage:
        """Download what the cache lacks; the image, with layers read from the cache."""
        ref, ep = resolved.ref, resolved.endpoint
        config_desc, layer_descs = oci.manifest_parts(resolved.manifest, str(ref))
        config_digest = str(config_desc.get("digest", ""))
        if config_desc.get("mediaType") == oci.SIF_CONFIG:
            raise CapsidError(f"{ref} is a SIF stored with ORAS, not a container image",
                              f"pull it with oras://{ref}")
        check_digest(config_digest)
        if not self.store.has(config_digest):
            self.store.put(self.client.blob_bytes(ep, config_digest))
        missing = [d for d in layer_descs if not self.store.has(str(d.get("digest", "")))]
        total = sum(int(d.get("size", 0)) for d in missing)
        progress = Progress(total, f"Fetching {len(missing)} layers")
        self.client.progress = progress
        try:
            with ThreadPoolExecutor(PARALLEL_DOWNLOADS) as pool:
                for future in [pool.submit(self.client.fetch_blob, ep, str(d["digest"]),
                                           self.store) for d in missing]:
                    future.result()
        finally:
            self.client.progress = None
            progress.end()
        config_raw = self.store.read(config_digest)
        layers = [oci.Layer(str(d["digest"]), int(d.get("size", 0)), str(d.get("mediaType", "")),
                            _opener(self.store.blob_path(str(d["digest"]))))
                  for d in layer_descs]
        return oci.SourceImage(f"docker://{ref}", oci.image_config(config_raw),
                               layers, resolved.digest, config_raw)

    def oras_sif(self, ref: Reference, platform: tuple[str, str]) -> Path:
        """The SIF stored as an ORAS artifact at *ref*, downloaded into the cache."""
        resolved = self.resolve(ref, platform)
        _config, layers = oci.manifest_parts(resolved.manifest, str(ref))
        sifs = [d for d in layers if d.get("mediaType") == oci.SIF_LAYER]
        if not sifs:
            raise CapsidError(f"{ref} is not a SIF stored with ORAS",
                              f"for container images use docker://{ref}")
        digest = check_digest(str(sifs[0]["digest"]))
        return self.client.fetch_blob(resolved.endpoint, digest, self.store)

    # -- conversion --------------------------------------------------------------------------

    def cached_sif(self, ref: Reference, platform: tuple[str, str],
                   compression: str = "zstd") -> Path:
        """A SIF of *ref* in the cache, converted once per manifest digest."""
        from capsid.oci import tosif

        resolved = self.resolve(ref, platform)
        path = self.store.sif_path(resolved.digest, compression)
        if path.is_file():
            LOG.info("using cached %s", path)
            return path
        with self.store.lock(path.name + ".lock"):
            if path.is_file():
                return path
            source = self.fetch(resolved)
            tosif.write_sif(source, path, compression=compression, force=True, verified=True)
        return path


def _opener(path: Path) -> oci.Opener:
    return lambda: open(path, "rb")
