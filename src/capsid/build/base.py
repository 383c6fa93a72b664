"""Where a stage starts: the base image's layers (for the output), its configuration, and
its files: unpacked once into the build cache for steps that run commands, or the
squashfs a pull left, served by FUSE, for the steps capsid does itself (COPY, WORKDIR)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsid import log, tools
from capsid.build import treetar
from capsid.build.recipe import Base
from capsid.build.store import BuildStore, digest
from capsid.errors import CapsidError, UsageError
from capsid.image import output
from capsid.oci import image as oci

LOG = log.get(__name__)


class BaseImage:
    """A stage's starting point."""

    def __init__(self, key: str, config: dict[str, Any], layers: list[oci.Layer] | None,
                 name: str, unpack: Callable[[Path], None] | None,
                 rootfs: Path | None = None) -> None:
        self.key = key  #: identifies the content; part of every step's cache key
        self.config = config  #: the OCI image config ("config" holds Env, Cmd, ...)
        #: oldest first, as the output needs them; None: read back from the unpacked files
        self.layers = layers
        self.name = name
        self._unpack = unpack
        self._rootfs = rootfs

    def output_layers(self, store: BuildStore) -> list[oci.Layer]:
        """The base's layers for the output image."""
        if self.layers is not None:
            return self.layers
        root = str(self.rootfs(store))
        return [oci.Layer(None, 0, "", lambda: treetar.open_tree(root), key=self.key)]

    def squashfs(self, store: BuildStore, compression: str,
                 epoch: int | None) -> tuple[Path, int] | None:
        """(SIF, offset of its squashfs) of the base alone, as ``capsid pull`` makes it, for
        a build's output to be laid over: the one a pull left in capsid's cache when it
        is that (same stamp and definition), else one made here once. None for a base
        without layers of its own (a local image, scratch, debootstrap)."""
        found = self.existing_squashfs(store, compression, epoch)
        if found is not None or not self.layers:
            return found
        from capsid.oci import tosif

        source = oci.SourceImage(self.name, self.config, self.layers)
        stamp, text = self._expected(epoch)
        own = self._own_squashfs(store, compression, stamp)
        LOG.info("writing %s alone, for later builds to be laid over", self.name)
        tosif.write_image(source, own, compression=compression, force=True)
        offset = _usable(own, stamp, text)
        return None if offset is None else (own, offset)

    def existing_squashfs(self, store: BuildStore, compression: str,
                          epoch: int | None) -> tuple[Path, int] | None:
        """What :meth:`squashfs` gives where it is there already (a pull, or an earlier
        build, made it), without making it."""
        if not self.layers:
            return None
        from capsid.oci.store import Store

        stamp, text = self._expected(epoch)
        places = [self._own_squashfs(store, compression, stamp)]
        if self.key.startswith("sha256:"):
            try:  # the pull cache, if it is the user's own (its bytes go into the output)
                pulls = Store().prepare()
                pulled = pulls.sif_path(self.key, compression)
                if pulls.intact_sif(pulled):
                    places.insert(0, pulled)
            except CapsidError as err:
                LOG.debug("not using the pull cache: %s", err)
        for place in places:
            offset = _usable(place, stamp, text)
            if offset is not None:
                return place, offset
        return None

    def _own_squashfs(self, store: BuildStore, compression: str, stamp: int) -> Path:
        return store.bases / f"{digest('sif', self.key, compression, stamp)}.sif"

    def _expected(self, epoch: int | None) -> tuple[int, bytes]:
        """The creation stamp and definition file of the base's SIF as made now."""
        from capsid.oci import tosif

        source = oci.SourceImage(self.name, self.config, self.layers or [])
        return (epoch if epoch is not None else tosif.created(self.config),
                tosif.deffile(source).encode())

    def unpacked(self, store: BuildStore) -> Path | None:
        """The base's files as a directory, if they are unpacked already."""
        if self._rootfs is not None:
            return self._rootfs
        rootfs = store.bases / self.key[:40] / "rootfs"
        return rootfs if rootfs.is_dir() else None

    def rootfs(self, store: BuildStore) -> Path:
        """The base's files as a directory (unpacked once, then shared by every build)."""
        if self._rootfs is not None:
            return self._rootfs
        final = store.bases / self.key[:40]
        if not (final / "rootfs").is_dir():
            LOG.info("unpacking %s", self.name)
            temp = output.Temporary(store.tmp / "base", directory=True)
            try:
                (temp.path / "rootfs").mkdir()
                if self._unpack is not None:
                    self._unpack(temp.path / "rootfs")
                try:
                    os.rename(temp.path, final)
                except OSError:
                    if not (final / "rootfs").is_dir():
                        raise
            finally:
                temp.discard()
        self._rootfs = final / "rootfs"
        return self._rootfs


def _usable(path: Path, stamp: int, deffile: bytes) -> int | None:
    """Where the squashfs of SIF *path* starts, if it is the base as a build made now
    would write it (the same stamp and definition); else None."""
    from capsid.image import sif

    try:
        with sif.SifImage(path) as image:
            part = image.primary_partition()
            definition = image.find(sif.DataType.DEFFILE)
            if part is None or definition is None or image.header.created_at != stamp \
                    or part.partition()[0] != sif.FsType.SQUASHFS \
                    or image.read(definition) != deffile:
                return None
            return part.offset
    except (OSError, CapsidError):
        return None


def _extract(layers: list[oci.Layer], verified: bool) -> Callable[[Path], None]:
    """Unpack *layers* (flattened, newest first) into a directory with GNU tar."""
    def unpack(target: Path) -> None:
        from capsid.image import untar
        from capsid.image.flatten import Flattener
        from capsid.oci.tosif import add_layers

        def fill(write: untar.Write) -> None:
            flat = Flattener(write)
            add_layers(flat, layers, verified)
            flat.finish()

        untar.into(target, fill)
    return unpack


def _registry(ref: str, platform: tuple[str, str], nohttps: bool) -> BaseImage:
    from capsid.oci import reference
    from capsid.oci.pull import Puller

    with Puller(nohttps=nohttps) as puller:
        resolved = puller.resolve(reference.parse(ref), platform)
        source = puller.fetch(resolved)
    # named as the pull names it (docker://docker.io/library/busybox:1 for busybox:1): the
    # squashfs a pull left must read as this base's (see squashfs)
    return BaseImage(resolved.digest, source.config, source.layers, source.name,
                     _extract(source.layers, True))


def _archive(kind: str, ref: str, platform: tuple[str, str]) -> BaseImage:
    from capsid.oci import archive

    source = (archive.docker_archive(ref, platform) if kind == "docker-archive"
              else archive.oci_layout(ref, platform, f"{kind}:"))
    key = digest(hashlib.sha256(source.config_raw).hexdigest(),
                 [layer.digest for layer in source.layers])
    return BaseImage(key, source.config, source.layers, f"{kind}:{ref}",
                     _extract(source.layers, False))


def _local(path: str) -> BaseImage:
    """A SIF, squashfs or sandbox on disk. A file's tree is unpacked with unsquashfs and
    read back for the output (owners become root, as when an ordinary user unpacks it)."""
    from capsid.image import squashfs
    from capsid.image.locate import SANDBOX, locate

    image = locate(path)
    real = os.path.realpath(path)
    info = os.stat(real)
    if image.kind == SANDBOX:
        return BaseImage(digest("sandbox", real, info.st_mtime_ns), {}, None, path, None,
                         Path(real))
    config: dict[str, Any] = {}
    if image.oci_config is not None:
        with open(real, "rb") as f:
            f.seek(image.oci_config[0])
            try:
                run = json.loads(f.read(image.oci_config[1]))
                config = {"config": run} if isinstance(run, dict) else {}
            except ValueError:
                config = {}

    def unpack(target: Path) -> None:
        target.rmdir()  # unsquashfs makes it
        squashfs.extract(Path(real), target, image.offset)

    return BaseImage(digest("image", real, info.st_size, info.st_mtime_ns), config, None,
                     path, unpack)


def _check_signers(path: str, header: str) -> None:
    """``Fingerprints:``: the image verifies, and each key listed signed all of it."""
    from capsid.image.locate import SIF, locate
    from capsid.signing import keyring, sifsign

    wanted = [f.strip().upper() for f in header.split("#")[0].split(",") if f.strip()]
    if not wanted:
        return
    if locate(path).kind != SIF:
        raise CapsidError(f"Fingerprints: {path} is not a SIF file, so it carries no "
                          "signatures", "build from a signed SIF, or drop Fingerprints:")
    result = sifsign.verify(Path(path), keyring.load(keyring.PUBLIC))
    if not result.ok:
        why = next((s.error for s in result.signatures if s.error), None) \
            or (result.problems[0] if result.problems else "it is not signed")
        raise CapsidError(f"Fingerprints: {path} does not verify: {why}",
                          "import its signer's key with 'capsid key import FILE', or get "
                          "the image again from its signer")
    groups = {s.group for s in result.signatures}
    for fingerprint in wanted:
        signed = {s.group for s in result.signatures if s.fingerprint.upper() == fingerprint}
        if signed != groups:
            raise CapsidError(f"Fingerprints: {path} is not signed by {fingerprint}",
                              "build from the image its owner signed, or fix the "
                              "Fingerprints: header")


def _scratch(store: BuildStore) -> BaseImage:
    empty = store.bases / "scratch" / "rootfs"
    empty.mkdir(parents=True, exist_ok=True)
    return BaseImage("scratch", {}, [], "scratch", None, empty)


def _busybox(store: BuildStore) -> BaseImage:
    busybox = tools.find("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise CapsidError("Bootstrap: busybox needs the host's static busybox",
                          "apt-get install busybox-static")
    with open(busybox, "rb") as f:
        key = digest("busybox", hashlib.sha256(f.read()).hexdigest())

    def unpack(target: Path) -> None:
        import shutil

        applets = tools.run([busybox, "--list"]).decode().split()
        for d in ("bin", "etc", "root", "tmp", "usr/bin", "usr/sbin", "sbin", "dev", "proc",
                  "sys", "home", "var/tmp"):
            (target / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, target / "bin" / "busybox")
        for applet in applets:
            if not (target / "bin" / applet).exists():
                (target / "bin" / applet).symlink_to("busybox")
        (target / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (target / "etc" / "group").write_text("root:x:0:\n")
        (target / "tmp").chmod(0o1777)

    return BaseImage(key, {}, None, "busybox", unpack)


def _debootstrap(options: dict[str, str], platform: tuple[str, str],
                 quiet: bool) -> BaseImage:
    from capsid.build import debootstrap

    suite, mirror = options["osversion"], options["mirrorurl"]
    include = sorted(set(options.get("include", "").replace(",", " ").split()))
    arch = {"arm": "armhf", "386": "i386"}.get(platform[0], platform[0])

    def unpack(target: Path) -> None:
        debootstrap.run(debootstrap.argv(suite, mirror, include, arch, target, quiet), target)

    key = digest("debootstrap", debootstrap.VARIANT, suite, mirror, include, arch)
    return BaseImage(key, {"architecture": platform[0], "os": "linux"}, None,
                     f"debootstrap {suite} from {mirror}", unpack)


def open_base(base: Base, store: BuildStore, platform: tuple[str, str],
              nohttps: bool, quiet: bool = False) -> BaseImage:
    """The image a stage starts from (registry images are resolved now: tags move)."""
    if base.kind == "docker":
        return _registry(base.ref.removeprefix("docker://"), platform, nohttps)
    if base.kind in ("docker-archive", "oci-archive", "oci"):
        return _archive(base.kind, base.ref, platform)
    if base.kind == "localimage":
        if base.options.get("fingerprints"):
            _check_signers(base.ref, base.options["fingerprints"])
        return _local(base.ref)
    if base.kind == "scratch":
        return _scratch(store)
    if base.kind == "busybox":
        return _busybox(store)
    if base.kind == "debootstrap":
        return _debootstrap(base.options, platform, quiet)
    raise UsageError(f"Bootstrap: {base.kind} is not available in capsid yet",
                     "start from an image: Bootstrap: docker, From: debian:12")
