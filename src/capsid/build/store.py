"""The build cache: each step's result as a directory, keyed by everything that made it.

``$CAPSID_CACHEDIR/build/``::

    layers/<key>/diff/         the step's changes (an overlayfs upper directory)
    layers/<key>/state.json    the image configuration after the step
    bases/<key>/rootfs/        a base image unpacked once, to run steps on
    mounts/<id>/               RUN --mount=type=cache directories
    images/<key>.sif           the SIF of a build, reused when every step is cached
    tmp/                       steps being built (locked; a killed build's are removed)

A result is built under ``tmp/`` and renamed into place when complete, so a reader
never sees half a step, two builds of the same step both succeed (the second one's
rename finds the first's result and discards its own), and ``kill -9`` leaves only
a locked temporary that the next build removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from capsid.build.state import ImageState
from capsid.errors import CapsidError
from capsid.image import output


def digest(*parts: object) -> str:
    """A cache key: the sha256 of *parts* in a canonical JSON form."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Layer:
    """A finished step: its directory of changes (maybe empty) and the state after it."""

    __slots__ = ("diff", "key", "state")

    def __init__(self, key: str, diff: Path, state: ImageState) -> None:
        self.key, self.diff, self.state = key, diff, state

    @property
    def empty(self) -> bool:
        with os.scandir(self.diff) as entries:
            return not any(entries)


class Pending:
    """A step being built: its upper and work directories, under a lock."""

    def __init__(self, store: BuildStore) -> None:
        self.store = store
        self.temp = output.Temporary(store.tmp / "step", directory=True)
        self.diff = self.temp.path / "diff"
        self.work = self.temp.path / "work"
        self.scratch = self.temp.path / "scratch"  # mount points, bound files
        for d in (self.diff, self.work, self.scratch):
            d.mkdir()

    def publish(self, key: str, state: ImageState, replace: bool = False) -> Layer:
        """Make the result the cached layer *key* (or take the one another build made;
        with *replace*, as ``--no-cache`` asks, ours replaces it)."""
        (self.temp.path / "state.json").write_text(json.dumps(state.to_json(), sort_keys=True))
        for d in (self.work, self.scratch):
            output.remove(d)
        from capsid.runtime import linux

        fd = os.open(self.temp.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # the step's files reach the disk before the layer is kept (RUN steps fake fsync)
            linux.syncfs(fd)
        finally:
            os.close(fd)
        final = self.store.layers / key
        if replace and final.exists():
            old = output.Temporary(self.store.tmp / "replaced", directory=True)
            os.rename(final, old.path / "layer")
            old.discard()
        try:
            os.rename(self.temp.path, final)
        except OSError:  # another build finished the same step first
            if not (final / "state.json").is_file():
                raise
        self.temp.discard()
        layer = self.store.get(key)
        assert layer is not None
        return layer

    def reset(self) -> None:
        """Empty the step's upper and work directories, for it to start over (the
        scratch directory keeps what the step wrote there for itself)."""
        for d in (self.diff, self.work):
            output.remove(d)
            d.mkdir()

    def discard(self) -> None:
        self.temp.discard()


#: File systems overlayfs cannot take an upper directory on (home directories of HPC
#: sites often are one of these).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph",
                       "fuse.sshfs", "panfs", "wekafs")


def filesystem_type(path: Path) -> str:
    """The type of the file system *path* is on, from /proc/self/mountinfo ('' if unknown)."""
    try:
        real = str(path.resolve())
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, line.split(" - ", 1)[1].split()[0]
    return kind


def build_root(cache_root: Path) -> Path:
    """Where build layers live: beside the rest of the cache, or, when that is on a network
    file system, in $CAPSID_BUILD_CACHEDIR or a local temporary directory.

    The host's root keeps its layers apart (``build-root``): their files belong to the
    range of ids its steps run as (see :func:`capsid.runtime.userns.enter_for_build`).
    """
    from capsid import hostfs

    shifted = hostfs.host_alias() is not None
    explicit = os.environ.get("CAPSID_BUILD_CACHEDIR")
    if explicit:
        return Path(explicit) / "root-build" if shifted else Path(explicit)
    probe = cache_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if filesystem_type(probe) in NETWORK_FILESYSTEMS:
        from capsid import config

        scratch = config.env("TMPDIR") or os.environ.get("TMPDIR") or "/var/tmp"
        # the real uid: inside a build's user namespace os.getuid() is 0 for everyone
        local = Path(scratch) / f"capsid-build-{hostfs.real_uid()}{'-root' if shifted else ''}"
        from capsid import log

        log.get(__name__).info("%s is on a network file system: build layers go to %s "
                               "(set CAPSID_BUILD_CACHEDIR to choose)", cache_root, local)
        return local
    return cache_root / ("build-root" if shifted else "build")


class BuildStore:
    """Where the builder keeps its layers."""

    def __init__(self, root: Path) -> None:
        self.root = build_root(root)
        self.layers, self.bases = self.root / "layers", self.root / "bases"
        self.mounts, self.tmp = self.root / "mounts", self.root / "tmp"
        self.images = self.root / "images"  #: SIFs of finished builds, by their last step

    def prepare(self) -> BuildStore:
        from capsid import hostfs

        try:  # it may sit in a shared place ($TMPDIR): another user's is never reused
            explicit = os.environ.get("CAPSID_BUILD_CACHEDIR")
            if explicit:
                hostfs.private_dir(explicit, "build cache")
            hostfs.private_dir(str(self.root), "build cache")
            for d in (self.layers, self.bases, self.mounts, self.tmp, self.images):
                hostfs.private_dir(str(d), "build cache", parents=False)
        except OSError as err:
            raise CapsidError(f"cannot use the build cache {self.root}: {err.strerror}",
                              "set CAPSID_CACHEDIR to a writable directory") from None
        output.clean_stale(self.tmp)
        return self

    def get(self, key: str) -> Layer | None:
        """The cached layer *key*, if a build finished it."""
        directory = self.layers / key
        try:
            state = ImageState.from_json(json.loads((directory / "state.json").read_text()))
        except (OSError, ValueError):  # not finished, or damaged: built again
            return None
        with contextlib.suppress(OSError):
            os.utime(directory)  # last use, for 'capsid cache clean --days'
        return Layer(key, directory / "diff", state)

    def begin(self) -> Pending:
        return Pending(self)

    def cache_mount(self, name: str) -> Path:
        """The persistent directory of ``RUN --mount=type=cache,id=NAME``."""
        from capsid import hostfs

        path = self.mounts / digest(name)[:32]
        hostfs.private_dir(str(path), "build cache", parents=False, for_steps=True)
        return path

    def entries(self) -> list[tuple[str, Path, int, float]]:
        """(kind, directory, bytes, last use) of every cached layer and unpacked base."""
        found = []
        for kind, parent in (("layer", self.layers), ("base", self.bases),
                             ("mount", self.mounts), ("image", self.images)):
            for directory in sorted(parent.iterdir()) if parent.is_dir() else []:
                if directory.name.startswith("."):
                    continue  # a temporary being written
                size = directory.stat().st_size if directory.is_file() else 0
                for dirpath, _dirs, files in os.walk(directory):
                    for name in files:
                        with contextlib.suppress(OSError):
                            size += os.lstat(os.path.join(dirpath, name)).st_size
                found.append((kind, directory, size, directory.stat().st_mtime))
        return found

    def clean(self, older_than_days: float | None = None, dry_run: bool = False) -> list[Path]:
        """Remove cached layers, bases and cache mounts (those unused for a while, if given)."""
        import time

        cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
        removed = []
        for _kind, directory, _size, used in self.entries():
            if cutoff is not None and used > cutoff:
                continue
            if not dry_run:
                output.remove(directory)
            removed.append(directory)
        return removed
