"""From a reference to a cached, verified image and a SIF made from it.

``resolve`` walks the endpoints (mirrors first) to the platform's manifest,
``fetch`` downloads what the cache lacks (layers in parallel) and
``cached_sif`` converts once per manifest digest, under a lock, so a second
``capsid exec docker://…`` — or the other 31 ranks of a job — find it ready. Its
conversion reads each layer while it downloads, and ends only once every layer
matched its digest; a download that starts over makes it convert again from the cache.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, cast

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
        #: the cached SIFs this puller made (no one else has a name of them yet)
        self.made: set[Path] = set()

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
        resolved = Resolved(ref, ep, doc, digest)
        if top_media not in oci.INDEXES:
            self._check_platform(resolved, platform)
        self.store.tag(str(ref), top_digest, top_media, len(raw))
        return resolved

    def _from_cache(self, ref: Reference, digest: str, platform: tuple[str, str]) -> Resolved:
        doc = oci.load_json(self.store.read(digest), "manifest")
        single = oci.media_type(doc) not in oci.INDEXES
        if not single:
            digest = str(oci.choose_platform(doc, platform, str(ref))["digest"])
            doc = oci.load_json(self.store.read(digest), "manifest")
        resolved = Resolved(ref, Endpoint(ref, self.nohttps), doc, digest)
        if single:
            self._check_platform(resolved, platform)
        return resolved

    def _check_platform(self, resolved: Resolved, platform: tuple[str, str]) -> None:
        """An image without an index has one architecture: is it the one asked for?"""
        config_desc = resolved.manifest.get("config")
        if not isinstance(config_desc, dict) or config_desc.get("mediaType") == oci.SIF_CONFIG:
            return  # not a container image: its own errors come later
        config_digest, _ = self._config(resolved)
        oci.check_platform(oci.image_config(self.store.read(config_digest)), platform,
                           str(resolved.ref))

    # -- blobs -----------------------------------------------------------------------------

    def _config(self, resolved: Resolved) -> tuple[str, list[dict[str, Any]]]:
        """The image config's digest, now in the cache, and the layers' descriptors."""
        ref = resolved.ref
        config_desc, layer_descs = oci.manifest_parts(resolved.manifest, str(ref))
        if config_desc.get("mediaType") == oci.SIF_CONFIG:
            raise CapsidError(f"{ref} is a SIF stored with ORAS, not a container image",
                              f"pull it with oras://{ref}")
        config_digest = check_digest(str(config_desc.get("digest", "")))
        if not self.store.has(config_digest):
            self.store.put(self.client.blob_bytes(resolved.endpoint, config_digest))
        return config_digest, layer_descs

    def fetch(self, resolved: Resolved) -> oci.SourceImage:
        """Download what the cache lacks; the image, with layers read from the cache."""
        ref, ep = resolved.ref, resolved.endpoint
        config_digest, layer_descs = self._config(resolved)
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

        def make(path: Path) -> None:
            try:
                with self._arriving(resolved) as source:
                    tosif.write_sif(source, path, compression=compression, force=True,
                                    verified=True)
            except _Rewound:  # a download started over: convert what is now in the cache
                LOG.debug("a layer was downloaded again; converting it afresh")
                tosif.write_sif(self.fetch(resolved), path, compression=compression,
                                force=True, verified=True)

        path, made = self.store.converted(resolved.digest, compression, make)
        if made:
            self.made.add(path)
        return path

    @contextlib.contextmanager
    def _arriving(self, resolved: Resolved) -> Iterator[oci.SourceImage]:
        """:meth:`fetch`, but the image's layers are read as they download: converting
        one overlaps the download of it and of the next (each ends once checked)."""
        ref, ep = resolved.ref, resolved.endpoint
        config_digest, layer_descs = self._config(resolved)
        arrivals: dict[str, _Arrival] = {}
        for desc in layer_descs:
            digest = check_digest(str(desc.get("digest", "")))
            if not self.store.has(digest) and digest not in arrivals:
                arrivals[digest] = _Arrival()
        total = sum(int(d.get("size", 0)) for d in layer_descs
                    if str(d.get("digest")) in arrivals)
        progress = Progress(total, f"Fetching {len(arrivals)} layers")
        self.client.progress = progress

        def download(digest: str, arrival: _Arrival) -> None:
            try:
                arrival.finish(self.client.fetch_blob(ep, digest, self.store, arrival))
            except BaseException as err:
                arrival.fail(err)
                raise

        try:
            with ThreadPoolExecutor(PARALLEL_DOWNLOADS) as pool:
                futures = [pool.submit(download, digest, arrival)
                           for digest, arrival in arrivals.items()]
                try:
                    layers = [oci.Layer(str(d["digest"]), int(d.get("size", 0)),
                                        str(d.get("mediaType", "")),
                                        arrivals[str(d["digest"])].opener
                                        if str(d["digest"]) in arrivals
                                        else _opener(self.store.blob_path(str(d["digest"]))))
                              for d in layer_descs]
                    config_raw = self.store.read(config_digest)
                    yield oci.SourceImage(f"docker://{ref}", oci.image_config(config_raw),
                                          layers, resolved.digest, config_raw)
                except BaseException:
                    for arrival in arrivals.values():
                        arrival.abandon()
                    raise
                for future in futures:
                    future.result()
        finally:
            self.client.progress = None
            progress.end()


def _opener(path: Path) -> oci.Opener:
    return lambda: open(path, "rb")


class _Rewound(Exception):
    """A layer's download started over after some of it had been read."""


class _Arrival:
    """A layer on its way into the cache, to be read while it arrives.

    The download thread says where the bytes go and how many there are
    (:class:`capsid.oci.registry.BlobWatch`), then that the blob is complete and
    matched its digest (:meth:`finish`) or that it failed (:meth:`fail`). A reader
    waits for bytes that are not there yet, and sees the end of the layer only once
    it is checked: nothing converted from a layer that turns out wrong is kept.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.path: Path | None = None
        self.size = 0  #: bytes written so far
        self.valid = 0  #: bytes that will not be written again
        self.readers: list[_Following] = []
        self.final: Path | None = None
        self.error: BaseException | None = None
        self.abandoned = False

    def start(self, partial: Path, valid: int) -> None:
        with self.cond:
            self.path, self.size, self.valid = partial, valid, valid
            for reader in self.readers:
                reader.restart(partial, valid)
            self.cond.notify_all()

    def wrote(self, size: int) -> None:
        with self.cond:
            self.size = size
            self.cond.notify_all()

    def finish(self, final: Path) -> None:
        with self.cond:
            self.final = final
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    def abandon(self) -> None:
        """The conversion stopped: readers waiting for more are told to stop too."""
        with self.cond:
            self.abandoned = True
            self.cond.notify_all()

    def opener(self) -> BinaryIO:
        reader = _Following(self)
        with self.cond:
            self.readers.append(reader)
        return cast("BinaryIO", reader)


class _Following:
    """A binary file over an :class:`_Arrival`: ``read`` waits for what is on its way."""

    def __init__(self, arrival: _Arrival) -> None:
        self.arrival = arrival
        self.fd = -1
        self.pos = 0
        self.rewound = self.reopen = False

    def restart(self, partial: Path, valid: int) -> None:
        """Called under the arrival's lock when bytes go to *partial* from *valid* on."""
        if self.pos > valid:
            self.rewound = True
        elif valid == 0:  # a new file, perhaps: open it afresh at the next read
            self.reopen = True

    def read(self, size: int = -1) -> bytes:
        """*size* bytes (all the rest if negative), fewer only at the end of the layer."""
        arrival = self.arrival
        with arrival.cond:
            while True:
                if self.rewound or arrival.abandoned:
                    raise _Rewound()
                if arrival.error is not None:
                    raise arrival.error
                if arrival.final is not None:
                    path, end = arrival.final, -1
                    break
                if (size >= 0 and arrival.path is not None
                        and arrival.size - self.pos >= size):
                    path, end = arrival.path, arrival.size
                    break
                arrival.cond.wait()
            if self.reopen:
                self.close()
                self.reopen = False
            if self.fd < 0:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if size < 0:
            size = os.fstat(self.fd).st_size - self.pos
        data = os.pread(self.fd, size if end < 0 else min(size, end - self.pos), self.pos)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Following:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
