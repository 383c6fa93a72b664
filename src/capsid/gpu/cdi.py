"""Container Device Interface: ``--device vendor/class=name`` from the vendors' spec files.

CDI (the spec Podman, containerd and Apptainer 1.5 read) describes a device as edits
to a container: device nodes, bind mounts, variables and hooks. Vendors' tools write
the spec files (``nvidia-ctk cdi generate``) into ``/etc/cdi`` and ``/var/run/cdi``;
``--cdi-dirs`` names other directories. Spec versions 0.3 to 0.8 are read, as JSON or
YAML. Hooks are programs an OCI runtime would run as root; capsid does what the
common ones do itself (``update-ldcache``, ``create-symlinks``) and skips the others
with a warning.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from capsid import log
from capsid.errors import CapsidError, UsageError
from capsid.gpu.edits import Edits, Mount

LOG = log.get(__name__)

DEFAULT_DIRS = ("/etc/cdi", "/var/run/cdi")
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0")
_KIND = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?/[a-zA-Z0-9]([a-zA-Z0-9_.-]*[a-zA-Z0-9])?")
_NAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.:-]*[a-zA-Z0-9])?")
_HOOKS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
          "poststop")
#: nvidia-ctk hooks with nothing to do here: the device nodes are the host's own
_NOT_NEEDED = ("chmod", "disable-device-node-modification")
_FIX = "fix the spec file, or generate it again (nvidia-ctk cdi generate)"


class SpecError(CapsidError):
    """A spec file that is not valid CDI."""


class Spec:
    """One spec file: its kind, devices (name → edits) and edits for every device."""

    __slots__ = ("devices", "edits", "kind", "path")

    def __init__(self, path: str, kind: str, devices: dict[str, dict[str, Any]],
                 edits: dict[str, Any]) -> None:
        self.path, self.kind, self.devices, self.edits = path, kind, devices, edits


def parse_name(text: str) -> tuple[str, str]:
    """``nvidia.com/gpu=0`` → ("nvidia.com/gpu", "0")."""
    kind, sep, name = text.partition("=")
    if not sep or not _KIND.fullmatch(kind) or not _NAME.fullmatch(name):
        raise UsageError(f"--device {text!r} is not a CDI device name",
                         "write it as vendor/class=name, e.g. --device nvidia.com/gpu=0 "
                         "or nvidia.com/gpu=all")
    return kind, name


def _fail(path: str, where: str, problem: str) -> SpecError:
    return SpecError(f"CDI spec {path}: {where}: {problem}", _FIX)


def _load(path: str) -> Any:
    with open(path, "rb") as f:
        raw = f.read(16 << 20)
    if path.endswith(".json"):
        try:
            return json.loads(raw)
        except ValueError as err:
            raise SpecError(f"CDI spec {path} is not valid JSON: {err}", _FIX) from None
    try:
        import yaml
    except ImportError:  # pragma: no cover - a dependency of capsid
        raise CapsidError(f"cannot read the YAML CDI spec {path}: PyYAML is missing",
                          "install capsid with its dependencies (pip install capsid)") from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise SpecError(f"CDI spec {path} is not valid YAML: {problem}", _FIX) from None


def _strings(path: str, where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, where, "must be a list of strings")
    return value


def _check_edits(path: str, where: str, edits: Any) -> dict[str, Any]:
    if edits is None:
        return {}
    if not isinstance(edits, dict):
        raise _fail(path, where, "must be a mapping")
    for index, item in enumerate(_strings(path, f"{where}.env", edits.get("env"))):
        if "=" not in item or not item.split("=", 1)[0]:
            raise _fail(path, f"{where}.env[{index}]", f"{item!r} is not NAME=VALUE")
    for field, required in (("deviceNodes", ("path",)), ("mounts", ("hostPath", "containerPath")),
                            ("hooks", ("hookName", "path"))):
        items = edits.get(field)
        if items is None:
            continue
        if not isinstance(items, list):
            raise _fail(path, f"{where}.{field}", "must be a list")
        for index, item in enumerate(items):
            here = f"{where}.{field}[{index}]"
            if not isinstance(item, dict):
                raise _fail(path, here, "must be a mapping")
            for key in required:
                if not isinstance(item.get(key), str) or not item[key]:
                    raise _fail(path, f"{here}.{key}", "is missing")
            for key in ("path", "containerPath", "hostPath"):
                if key in item and not str(item[key]).startswith("/"):
                    raise _fail(path, f"{here}.{key}", f"{item[key]!r} is not an absolute path")
            if field == "hooks" and item["hookName"] not in _HOOKS:
                raise _fail(path, f"{here}.hookName", f"{item['hookName']!r} is not one of "
                            f"{', '.join(_HOOKS)}")
            for key in ("args", "env", "options"):
                _strings(path, f"{here}.{key}", item.get(key))
    return edits


def read_spec(path: str) -> Spec:
    """Read and check one spec file."""
    doc = _load(path)
    if not isinstance(doc, dict):
        raise SpecError(f"CDI spec {path} is not a mapping of cdiVersion, kind and devices",
                        _FIX)
    version = doc.get("cdiVersion")
    if version not in VERSIONS:
        raise _fail(path, "cdiVersion", f"{version!r} is not a version capsid reads "
                    f"({', '.join(VERSIONS)})")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise _fail(path, "kind", f"{kind!r} is not vendor/class")
    devices = doc.get("devices")
    if not isinstance(devices, list) or not devices:
        raise _fail(path, "devices", "must be a non-empty list")
    named: dict[str, dict[str, Any]] = {}
    for index, device in enumerate(devices):
        if not isinstance(device, dict):
            raise _fail(path, f"devices[{index}]", "must be a mapping")
        name = device.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _fail(path, f"devices[{index}].name", f"{name!r} is not a device name")
        if name in named:
            raise _fail(path, f"devices[{index}].name", f"{name!r} is defined twice")
        named[name] = _check_edits(path, f"devices[{index}].containerEdits",
                                   device.get("containerEdits"))
    return Spec(path, kind, named, _check_edits(path, "containerEdits",
                                                doc.get("containerEdits")))


def _kind_of(path: str) -> str | None:
    """The kind a spec file declares, read loosely (to tell whether its errors matter)."""
    try:
        with open(path, "rb") as f:
            found = re.search(rb"""["']?kind["']?\s*:\s*["']?([^"',\s}]+)""", f.read(1 << 16))
    except OSError:
        return None
    return found.group(1).decode(errors="replace") if found else None


def specs(dirs: list[str], kinds: set[str]) -> dict[str, Spec]:
    """The specs of *kinds* in *dirs* (later directories win), by kind and device.

    A broken file of a wanted kind (or of no readable kind) is an error; a broken file
    of another vendor's only a debug message.
    """
    found: dict[str, Spec] = {}
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise CapsidError(f"cannot list the CDI directory {directory}: {err.strerror}",
                              "fix its permissions, or name others with --cdi-dirs") from None
        for name in names:
            if not name.endswith((".json", ".yaml", ".yml")):
                continue
            path = os.path.join(directory, name)
            try:
                spec = read_spec(path)
            except (SpecError, OSError) as err:
                declared = _kind_of(path)
                if declared is not None and declared not in kinds:
                    LOG.debug("ignoring %s: %s", path, err)
                    continue
                if isinstance(err, OSError):
                    raise CapsidError(f"cannot read the CDI spec {path}: {err.strerror}",
                                      "fix its permissions") from None
                raise
            if spec.kind in kinds:
                for device in spec.devices:
                    found[f"{spec.kind}={device}"] = spec
    return found


def edits(requested: list[str], dirs: list[str]) -> Edits:
    """The edits for the devices named in *requested* (``vendor/class=name``)."""
    wanted = [parse_name(text) for text in requested]
    known = specs(dirs, {kind for kind, _ in wanted})
    result = Edits()
    applied: set[str] = set()
    for kind, name in wanted:
        if f"{kind}={name}" in known:
            names = [name]
        elif name == "all":
            names = sorted(n.split("=", 1)[1] for n in known if n.startswith(kind + "="))
        else:
            names = []
        if not names:
            have = ", ".join(sorted(n for n in known if n.startswith(kind + "="))) or "none"
            raise CapsidError(f"no CDI spec in {', '.join(dirs)} defines {kind}={name} "
                              f"(devices of {kind}: {have})",
                              "generate the spec (for NVIDIA: nvidia-ctk cdi generate "
                              "--output=/etc/cdi/nvidia.yaml), or name its directory with "
                              "--cdi-dirs")
        for each in names:
            spec = known[f"{kind}={each}"]
            if spec.path not in applied:
                applied.add(spec.path)
                _apply(spec.path, f"{kind} (all devices)", spec.edits, result)
            _apply(spec.path, f"{kind}={each}", spec.devices[each], result)
    return result


def _apply(path: str, device: str, edits: dict[str, Any], result: Edits) -> None:
    for item in edits.get("env") or ():
        key, _, value = item.partition("=")
        result.env[key] = value
    for node in edits.get("deviceNodes") or ():
        host = node.get("hostPath") or node["path"]
        if not os.path.exists(host):
            raise CapsidError(f"CDI spec {path}: {device}: the device node {host} does not "
                              "exist on this host",
                              "generate the spec again: the driver or the devices changed")
        result.devices.append(Mount(host, node["path"], readonly=False, device=True))
    for mount in edits.get("mounts") or ():
        options = mount.get("options") or []
        if mount.get("type", "bind") not in ("bind", "rbind", None) and "bind" not in options:
            LOG.warning("CDI spec %s: %s: skipping the %s mount on %s (capsid makes bind "
                        "mounts only)", path, device, mount.get("type"), mount["containerPath"])
            continue
        if not os.path.exists(mount["hostPath"]):
            raise CapsidError(f"CDI spec {path}: {device}: {mount['hostPath']} does not "
                              "exist on this host",
                              "generate the spec again: the driver or the devices changed")
        result.mounts.append(Mount(mount["hostPath"], mount["containerPath"],
                                   readonly="ro" in options))
    for hook in edits.get("hooks") or ():
        _hook(path, device, hook, result)
    if edits.get("additionalGIDs"):
        LOG.debug("CDI %s: additional groups are not available without privileges", device)


def _hook(path: str, device: str, hook: dict[str, Any], result: Edits) -> None:
    """Do what a known hook would do; warn about the others."""
    args = list(hook.get("args") or [os.path.basename(hook["path"])])
    words = [a for a in args[1:] if not a.startswith("-")]
    action = words[1] if words[:1] == ["hook"] and len(words) > 1 else (words or [""])[0]
    if action == "update-ldcache":
        for folder in _values(args, "--folder"):
            if folder not in result.library_dirs:
                result.library_dirs.append(folder)
    elif action == "create-symlinks":
        for link in _values(args, "--link"):
            target, sep, where = link.partition("::")
            if sep and where.startswith("/"):
                result.symlinks.append((target, where))
    elif action in _NOT_NEEDED:
        LOG.debug("CDI %s: hook %s not needed", device, action)
    else:
        LOG.warning("CDI spec %s: %s: skipping the hook %s (capsid runs no CDI hooks and "
                    "knows what update-ldcache and create-symlinks do)", path, device,
                    " ".join(args[:3]))


def _values(args: list[str], flag: str) -> list[str]:
    values = []
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1:])
    return values
