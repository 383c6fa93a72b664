"""Reading an image's metadata (labels, scripts, def file, environment) without mounting it."""

from __future__ import annotations

import json
from pathlib import Path

from capsid.image import meta, sif, squashfs
from capsid.image.locate import SANDBOX, SQUASHFS, Image


def metadata(image: Image) -> meta.Metadata:
    """The metadata of *image*, read from SIF objects or its ``/.singularity.d``."""
    if image.kind == SANDBOX:
        return meta.Metadata.from_tree(squashfs.read_dir(Path(image.path) / meta.ROOT))
    if image.kind == SQUASHFS:
        return _from_squashfs(image)
    with sif.SifImage(image.path) as f:
        stored = f.find(sif.DataType.GENERIC_JSON, "inspect-metadata.json")
        deffile = f.find(sif.DataType.DEFFILE)
        config = f.find(sif.DataType.GENERIC_JSON, "oci-config.json")
        result = (meta.Metadata.from_inspect_json(f.read(stored)) if stored
                  else _from_squashfs(image))
        if result.deffile is None and deffile is not None:
            result.deffile = f.read(deffile).decode(errors="replace")
        if config is not None:
            try:
                loaded = json.loads(f.read(config))
            except ValueError:
                loaded = None
            result.oci_config = loaded if isinstance(loaded, dict) else None
    return result


def _from_squashfs(image: Image) -> meta.Metadata:
    return meta.Metadata.from_tree(squashfs.read_tree(Path(image.path), "/" + meta.ROOT,
                                                      image.offset))


def apps(image: Image) -> dict[str, meta.Metadata]:
    """The image's SCIF apps (``/scif/apps/NAME/scif``), name → their metadata: labels,
    runscript, startscript, test, environment and help."""
    if image.kind == SANDBOX:
        files = squashfs.read_dir(Path(image.path) / "scif" / "apps")
    else:
        files = squashfs.read_tree(Path(image.path), "/scif/apps", image.offset)
    by_app: dict[str, dict[str, bytes | str]] = {}
    for rel, content in files.items():
        name, _, rest = rel.partition("/scif/")
        if "/" not in name and rest:
            by_app.setdefault(name, {})[rest] = content
    found = {}
    for name, tree in sorted(by_app.items()):
        info = meta.Metadata()
        try:
            labels = json.loads(tree.get("labels.json", b"{}"))
        except ValueError:
            labels = {}
        info.labels = {str(k): str(v) for k, v in labels.items()} \
            if isinstance(labels, dict) else {}
        for attr, rel in (("runscript", "runscript"), ("startscript", "startscript"),
                          ("test", "test"), ("helpfile", "runscript.help")):
            value = tree.get(rel)
            setattr(info, attr, value.decode(errors="replace")
                    if isinstance(value, bytes) else None)
        env = tree.get("env/90-environment.sh")
        if isinstance(env, bytes):
            info.environment = {f"/scif/apps/{name}/scif/env/90-environment.sh":
                                env.decode(errors="replace")}
        found[name] = info
    return found
