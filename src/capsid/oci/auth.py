"""Registry credentials in Docker's ``config.json`` format.

Read, first match wins: ``CAPSID_DOCKER_USERNAME``/``_PASSWORD`` (or the
``APPTAINER_``/``SINGULARITY_`` spellings), then capsid's own file (written by
``capsid registry login``; ``$CAPSID_AUTH_FILE``, default
``~/.config/capsid/auth.json``), ``$REGISTRY_AUTH_FILE`` (podman, skopeo),
``~/.docker/config.json``. Entries are ``{"auths": {HOST: {"auth": base64(user:pass)}}}``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from capsid import config
from capsid.errors import CapsidError
from capsid.oci import reference
from capsid.oci.reference import DOCKER_HUB

#: Docker's keys for Docker Hub in config.json
DOCKER_HUB_KEYS = reference.DOCKER_HUB_ALIASES


def own_file() -> Path:
    explicit = config.env("AUTH_FILE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "capsid" / "auth.json"


def search_path() -> list[Path]:
    paths = [own_file()]
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    paths.append(Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json")
    return paths


def _keys(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
            f"https://{host}/v2/"]
    if host == DOCKER_HUB:
        keys += list(DOCKER_HUB_KEYS)
    return keys


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CapsidError(f"cannot read credentials file {path}: {e}",
                          "fix or remove the file, or log in again") from None
    return data if isinstance(data, dict) else {}


def _user(entry: object) -> str | None:
    """The username of a config.json entry, or None where it has none."""
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            return base64.b64decode(entry["auth"]).decode().partition(":")[0]
        except (ValueError, UnicodeDecodeError):
            return None
    return str(entry["username"]) if entry.get("username") else None


def logins(path: Path | None = None) -> list[tuple[str, str, Path]]:
    """(registry, username, file) of every stored login, in the order they are read."""
    found = []
    for each in [path] if path else search_path():
        auths = _load(each).get("auths") or {}
        for key, entry in (auths.items() if isinstance(auths, dict) else []):
            user = _user(entry)
            if user is not None:
                found.append((key, user, each))
    return found


def credentials(host: str) -> tuple[str, str] | None:
    """(username, password) for *host*, or None for anonymous access."""
    user, password = config.env("DOCKER_USERNAME"), config.env("DOCKER_PASSWORD")
    if user and password is not None:
        return user, password
    for path in search_path():
        auths = _load(path).get("auths") or {}
        for key in _keys(host):
            entry = auths.get(key)
            if not isinstance(entry, dict):
                continue
            if entry.get("auth"):
                try:
                    decoded = base64.b64decode(entry["auth"]).decode()
                except (ValueError, UnicodeDecodeError):
                    raise CapsidError(f"the credentials for {host} in {path} are not valid "
                                      "base64", f"log in again: capsid registry login {host}") \
                        from None
                name, _, secret = decoded.partition(":")
                return name, secret
            if entry.get("username"):
                return str(entry["username"]), str(entry.get("password", ""))
    return None


def _save(path: Path, data: dict[str, Any]) -> None:
    from capsid.image import output

    path.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(path, (json.dumps(data, indent="\t") + "\n").encode(), 0o600)


def store(host: str, username: str, password: str, path: Path | None = None) -> Path:
    """Save credentials for *host* (file mode 0600); return the file written."""
    path = path or own_file()
    data = _load(path)
    auths = data.setdefault("auths", {})
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    auths[DOCKER_HUB_KEYS[0] if host == DOCKER_HUB else host] = {"auth": token}
    _save(path, data)
    return path


def remove(host: str, path: Path | None = None) -> bool:
    """Forget the credentials for *host*; False if there were none."""
    path = path or own_file()
    data = _load(path)
    auths = data.get("auths") or {}
    found = [k for k in _keys(host) if k in auths]
    for key in found:
        del auths[key]
    if found:
        _save(path, data)
    return bool(found)
