"""The cache: an OCI image layout of blobs, plus SIFs converted from them.

Layout under ``$CAPSID_CACHEDIR`` (default ``~/.cache/capsid``)::

    oci/               an OCI image layout (oci-layout, index.json, blobs/sha256/…)
    sif/sha256-HEX.sif a SIF made from the image whose manifest has that digest
    stamps/            each SIF's size, inode and mtime when it was made (see intact_sif)
    partial/           downloads in progress (resumed by the next process)
    locks/             one lock file per blob or SIF being made

Safe for many processes at once (an MPI job's ranks pulling one image): a
blob or SIF is made under an exclusive ``flock`` on its lock file, by one
process, into a temporary name, then renamed into place. A file under
``blobs/`` or ``sif/`` is therefore always complete; kill -9 at any moment
leaves at worst a partial download that the next process resumes, and the
kernel drops a dead process's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from capsid import config, log
from capsid.errors import CapsidError, ImageFormatError
from capsid.image import output
from capsid.oci.image import sha256_digest

LOG = log.get(__name__)

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def check_digest(digest: str) -> str:
    """*digest* if it is a well-formed sha256 digest (so it is safe in a path)."""
    if not _DIGEST.fullmatch(digest):
        raise ImageFormatError(f"unsupported or malformed digest {digest[:80]!r}",
                               "only sha256 digests are supported")
    return digest


def default_root() -> Path:
    return Path(config.cache_root())


def fsync_rename(tmp: Path, final: Path) -> None:
    """Make *tmp* durable, then atomically give it the name *final*."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)


class Store:
    """Content-addressed blobs and converted SIFs on disk."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()
        self.layout = self.root / "oci"
        self.blobs = self.layout / "blobs" / "sha256"
        self.sifs = self.root / "sif"
        self.partials = self.root / "partial"
        self.locks = self.root / "locks"
        self.stamps = self.root / "stamps"

    def prepare(self) -> Store:
        from capsid import hostfs

        try:
            hostfs.private_dir(str(self.root), "cache directory")
            for d in (self.layout, self.layout / "blobs", self.blobs, self.sifs,
                      self.partials, self.locks, self.stamps):
                hostfs.private_dir(str(d), "cache directory")
            marker = self.layout / "oci-layout"
            if not marker.exists():
                output.write_bytes(marker, b'{"imageLayoutVersion":"1.0.0"}')
        except OSError as e:
            raise CapsidError(f"cannot use the cache directory {self.root}: {e.strerror}",
                              "set CAPSID_CACHEDIR to a writable directory") from None
        return self

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def partial_path(self, digest: str) -> Path:
        return self.partials / check_digest(digest).split(":", 1)[1]

    def commit(self, partial: Path, digest: str) -> Path:
        final = self.blob_path(digest)
        fsync_rename(partial, final)
        return final

    def put(self, data: bytes) -> str:
        """Store small *data* (a manifest, a config) and return its digest."""

        digest = sha256_digest(data)
        if not self.has(digest):
            output.write_bytes(self.blob_path(digest), data)
        return digest

    def read(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # -- locks ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the exclusive lock called *name* (blocks while another process has it)."""
        fd = os.open(self.locks / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- references (index.json) -----------------------------------------------------------

    def tag(self, ref: str, manifest_digest: str, media_type: str, size: int) -> None:
        """Record that *ref* pointed at *manifest_digest* (so it works offline later)."""
        with self.lock("index.json"):
            index = self._index()
            manifests = [m for m in index["manifests"]
                         if m.get("annotations", {}).get(REF_ANNOTATION) != ref]
            manifests.append({"mediaType": media_type, "digest": manifest_digest, "size": size,
                              "annotations": {REF_ANNOTATION: ref}})
            index["manifests"] = manifests
            output.write_bytes(self.layout / "index.json",
                               json.dumps(index, indent=1, sort_keys=True).encode())

    def lookup(self, ref: str) -> str | None:
        """The manifest digest *ref* last resolved to, if the cache has it."""
        for m in self._index()["manifests"]:
            if m.get("annotations", {}).get(REF_ANNOTATION) == ref and self.has(m["digest"]):
                return str(m["digest"])
        return None

    def _index(self) -> dict[str, Any]:
        try:
            loaded = json.loads((self.layout / "index.json").read_bytes())
            if isinstance(loaded, dict) and isinstance(loaded.get("manifests"), list):
                return loaded
        except (OSError, ValueError):
            pass
        return {"schemaVersion": 2, "manifests": []}

    # -- converted images --------------------------------------------------------------------

    def sif_path(self, manifest_digest: str, compression: str) -> Path:
        hexpart = check_digest(manifest_digest).split(":", 1)[1]
        suffix = "" if compression == "zstd" else f"-{compression}"
        return self.sifs / f"sha256-{hexpart}{suffix}.sif"

    def _stamp_path(self, sif: Path) -> Path:
        return self.stamps / f"{sif.name}.json"

    def record_sif(self, sif: Path) -> None:
        """Note how SIF *sif*, just made, looks (for :meth:`intact_sif`)."""
        st = os.stat(sif)
        output.write_bytes(self._stamp_path(sif), json.dumps(
            {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}).encode())

    def intact_sif(self, sif: Path) -> bool:
        """Whether cached SIF *sif* is as it was made.

        A pull gives the user its output as a second name of the SIF it made (see
        :func:`capsid.image.output.place`), through which the file may since have been
        changed in place (an overlay added, a signature): its mtime, which only its owner
        can set back, then differs from the one noted when it was made. A SIF that others
        may write through a second name is not trusted either.
        """
        try:
            st = os.stat(sif)
        except OSError:
            return False
        if st.st_nlink > 1 and st.st_mode & 0o022:
            return False
        try:
            noted = json.loads(self._stamp_path(sif).read_bytes())
        except (OSError, ValueError):
            return st.st_nlink == 1  # made before stamps were noted, and never shared
        return bool(noted == {"size": st.st_size, "ino": st.st_ino,
                              "mtime_ns": st.st_mtime_ns})

    def converted(self, digest: str, compression: str,
                  make: Callable[[Path], None]) -> tuple[Path, bool]:
        """The cached SIF of the image known by *digest*, and whether it was made now:
        *make* writes it (atomically, to the path it is given) once, under the SIF's
        lock, and again if it was changed since (:meth:`intact_sif`)."""
        path = self.sif_path(digest, compression)
        if self.intact_sif(path):
            LOG.info("using cached %s", path)
            return path, False
        with self.lock(path.name + ".lock"):
            if self.intact_sif(path):
                return path, False
            if path.exists():
                LOG.info("%s was changed since it was made (through the name a pull gave "
                         "it); making it again", path)
                self.drop_sif(path)
            make(path)
            self.record_sif(path)
        return path, True

    def drop_sif(self, sif: Path) -> None:
        """Remove cached SIF *sif* (not another name of it) and its stamp."""
        sif.unlink(missing_ok=True)
        self._stamp_path(sif).unlink(missing_ok=True)

    # -- housekeeping --------------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        """(kind, path, stat) for every blob, SIF and partial download."""
        for kind, d in (("blob", self.blobs), ("sif", self.sifs), ("partial", self.partials)):
            if not d.is_dir():
                continue
            for entry in sorted(d.iterdir()):
                if entry.name.startswith(".tmp-"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    yield kind, entry, entry.stat()

    def clean(self, older_than_days: float | None = None, dry_run: bool = False,
              kinds: frozenset[str] | None = None) -> list[Path]:
        """Remove cached files (only those unused for *older_than_days*, and of *kinds*,
        if given)."""
        cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
        removed = []
        for kind, path, st in list(self.entries()):
            if cutoff is not None and max(st.st_atime, st.st_mtime) > cutoff:
                continue
            if kinds is not None and kind not in kinds:
                continue
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                if kind == "sif":
                    self._stamp_path(path).unlink(missing_ok=True)
            removed.append(path)
        if cutoff is None and kinds is None and not dry_run:
            (self.layout / "index.json").unlink(missing_ok=True)
            if self.stamps.is_dir():
                for stamp in self.stamps.iterdir():
                    stamp.unlink(missing_ok=True)
        return removed
