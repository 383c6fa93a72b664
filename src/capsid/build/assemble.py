"""A built stage → a SIF (or a sandbox): the base's layers and the step directories,
flattened newest first straight into ``tar2sqfs``, with the image's metadata."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsid import __version__, log
from capsid.build import treetar
from capsid.build.builder import Builder, StageResult
from capsid.build.store import digest
from capsid.errors import CapsidError
from capsid.image import output
from capsid.oci import image as oci

LOG = log.get(__name__)


def _config(result: StageResult, epoch: int | None) -> dict[str, Any]:
    stamp = epoch if epoch is not None else int(time.time())
    return {"architecture": result.state.architecture or "amd64", "os": "linux",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
            "config": result.state.config,
            "rootfs": {"type": "layers", "diff_ids": []}}


def _def_files(result: StageResult, builder: Builder, config: dict[str, Any]
               ) -> dict[str, bytes]:
    """What a definition file puts into /.singularity.d, as Apptainer lays it out."""
    meta = result.stage.metadata
    if meta is None:
        return {}
    labels: dict[str, str] = dict(config["config"].get("Labels") or {})
    labels.update({"org.label-schema.schema-version": "1.0",
                   "org.label-schema.build-arch": config["architecture"],
                   "org.label-schema.build-date": time.strftime(
                       "%A_%-d_%B_%Y_%H:%M:%S_UTC",
                       time.gmtime(builder.epoch if builder.epoch is not None
                                   else time.time())),
                   "org.label-schema.usage.capsid.version": __version__})
    for key, value in result.stage.header.items():
        labels[f"org.label-schema.usage.singularity.deffile.{key}"] = value
    labels.update(result.state.labels)
    labels.update(meta.labels)
    files: dict[str, bytes] = {
        "Singularity": builder.recipe.text.encode(),
        "labels.json": json.dumps(labels, indent="\t", sort_keys=True).encode(),
        "env/90-environment.sh": ("#!/bin/sh\n# Custom environment shell code should follow"
                                  f"\n\n{meta.environment}").encode(),
    }
    if result.state.env91:
        files["env/91-environment.sh"] = result.state.env91.encode()
    scripts: dict[str, str | None] = {"runscript": meta.runscript, "test": meta.test,
                                       "startscript": meta.startscript,
                                       "runscript.help": meta.help}
    for name, script in scripts.items():
        if script is not None:
            files[name] = script.encode()
    return files


def _layers_record(result: StageResult, builder: Builder, config: dict[str, Any]) -> Any:
    from capsid.build import record
    from capsid.image import sif

    base = result.base.layers
    from_registry = base is not None and all(layer.digest for layer in base)
    content = record.make(
        config,
        [{"digest": layer.digest, "mediaType": layer.media_type, "size": layer.size}
         for layer in base or []] if from_registry else None,
        # a base of no registry's (a local SIF, a sandbox, debootstrap): its files, unpacked
        # in the build cache, become a layer of their own when pushed
        None if from_registry or base else str(result.base.rootfs(builder.store)),
        list((result.base.config.get("rootfs") or {}).get("diff_ids") or []),
        [layer.key for layer in result.layers if not layer.empty])
    return sif.NewObject(sif.DataType.GENERIC_JSON, content, record.NAME)


def _opener(diff: str, epoch: int | None) -> oci.Opener:
    return lambda: treetar.open_tree(diff, epoch)


def write(result: StageResult, builder: Builder, out: Path, *, sandbox: bool = False,
          force: bool = False, compression: str = "zstd") -> None:
    """Write the image of *result* to *out*: a SIF file, or a sandbox directory."""
    from capsid.oci import tosif

    config = _config(result, builder.epoch)
    layers = list(result.base.output_layers(builder.store))
    for layer in result.layers:
        if not layer.empty:
            layers.append(oci.Layer(None, 0, "", _opener(str(layer.diff), builder.epoch),
                                    key=f"step:{layer.key}"))
    source = oci.SourceImage(f"{builder.recipe.kind}:{builder.recipe.path}", config, layers,
                             None, json.dumps(config, sort_keys=True).encode())
    files = _def_files(result, builder, config)
    if builder.recipe.kind == "dockerfile":  # docker run starts in WORKDIR
        from capsid.image import meta

        run = config["config"]
        files["runscript"] = meta.oci_runscript(
            [str(a) for a in run.get("Entrypoint") or []], [str(a) for a in run.get("Cmd") or []],
            run.get("WorkingDir")).encode()
    if not sandbox:
        key = digest(result.key, result.state.to_json(), _metadata_key(files), compression,
                     builder.epoch)
        cached = _cached(builder.store.images, key)
        if cached is not None and not builder.opts.no_cache:  # every step was cached
            with output.atomic_file(out, force) as tmp:
                shutil.copyfile(cached, tmp)
                _give_back(tmp)
            LOG.info("%s is the cached image %s", out, cached.name)
            return
        below = result.base.squashfs(builder.store, compression, builder.epoch)
        tosif.write_image(source, out, compression=compression, force=force, verified=True,
                          extra=files, objects=[_layers_record(result, builder, config)],
                          lower=None if below is None else (*below, len(result.base.layers
                                                                         or [])))
        _give_back(out)
        with contextlib.suppress(OSError):
            _keep(out, builder.store.images, key)
        return
    # streamed straight into the directory, as pull --sandbox does: no SIF in between;
    # files keep the owners the steps gave them where those ids are mapped
    tosif.write_image(source, out, sandbox=True, force=force, verified=True, extra=files,
                      owners=builder.real_owners)
    from capsid import hostfs
    from capsid.runtime import userns

    alias = hostfs.host_alias()
    if alias is not None:  # root's build: the image's owners as they are, on the host
        _own(out, lambda uid: alias + uid if uid < alias else uid)
    elif os.geteuid() == 0 and 1 < userns.mapped_ids() < 0xFFFFFFFF:
        _own(out, lambda _uid: 0)  # subordinate ids: a directory the user could not remove


def _metadata_key(files: dict[str, bytes]) -> dict[str, str]:
    """What /.singularity.d gets, for the image's cache key: build arguments change it
    (``{{ VAR }}`` in %environment, %runscript, %labels) without changing a step. The
    build date is left out, or no build would ever be found again."""
    keyed = {name: content.decode(errors="replace") for name, content in files.items()}
    if "labels.json" in files:
        labels = json.loads(files["labels.json"])
        labels.pop("org.label-schema.build-date", None)
        keyed["labels.json"] = json.dumps(labels, sort_keys=True)
    return keyed


def _give_back(path: Path) -> None:
    """A root build's SIF belongs to the host's root, not to the range its steps ran as."""
    from capsid import hostfs

    alias = hostfs.host_alias()
    if alias is not None:
        os.chown(path, alias, alias)


def _own(top: Path, owner: Callable[[int], int]) -> None:
    """Give everything under *top* to ``owner(uid)`` (and likewise its group)."""
    for path in [str(top), *(os.path.join(parent, name) for parent, dirs, files in
                             os.walk(top) for name in dirs + files)]:
        info = os.lstat(path)
        os.lchown(path, owner(info.st_uid), owner(info.st_gid))
        if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o6000:
            os.chmod(path, stat.S_IMODE(info.st_mode))  # chown cleared set-id bits


def _stamp(info: os.stat_result) -> str:
    return f"{info.st_size}-{info.st_mtime_ns}"


def _cached(images: Path, key: str) -> Path | None:
    """The SIF an identical build wrote, unless it changed since (it may be the output
    itself, linked: ``sif add``, ``sign`` or an overlay partition write to SIFs in place)."""
    try:
        entries = [e for e in os.scandir(images) if e.name.startswith(key + ".")
                   and e.name.endswith(".sif")]
    except OSError:
        return None
    for entry in entries:
        stamp = entry.name[len(key) + 1:-len(".sif")]
        with contextlib.suppress(OSError):
            if stamp == _stamp(entry.stat(follow_symlinks=False)):
                return Path(entry.path)
            os.unlink(entry.path)
    return None


def _keep(out: Path, images: Path, key: str) -> None:
    """Keep the SIF for identical builds: a hard link where it can be (no copy), with its
    size and mtime in the name, so that a change made to it later is noticed."""
    temp = output.Temporary(images / f"{key}.sif")
    try:
        try:
            temp.path.unlink()
            os.link(out, temp.path)
        except OSError:  # another file system
            shutil.copyfile(out, temp.path)
        os.replace(temp.path, images / f"{key}.{_stamp(temp.path.stat())}.sif")
        temp.release()
    except BaseException:
        temp.discard()
        raise


def run_test(result: StageResult, out: Path, sandbox: bool, quiet: bool = False) -> None:
    """A definition file's %test, in the finished image; a failure removes the image."""
    meta = result.stage.metadata
    if meta is None or meta.test is None:
        return
    from capsid import hostfs
    from capsid.runtime import api
    from capsid.runtime.options import Options

    if not quiet:
        print("running %test", file=sys.stderr, flush=True)
    # In a root build the test runs as the build's root, as its steps do (and is confined
    # as they are: see capsid.runtime.userns.confine_build_step).
    root_build = hostfs.host_alias() is not None
    try:
        status = api.run(str(out), [], Options(cleanenv=True, writable_tmpfs=not sandbox,
                                               fakeroot=root_build), action="test")
    except CapsidError:
        output.remove(out)
        raise
    if status != 0:
        output.remove(out)
        raise CapsidError(f"%test failed with exit code {status}; {out} was removed",
                          "fix the test or the image, or build with --notest")
