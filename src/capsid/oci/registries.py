"""Site and user registry settings: mirrors and plain-HTTP registries.

A TOML file in the spirit of containers' ``registries.conf`` (version 2)::

    [[registry]]
    prefix = "docker.io"            # images this entry applies to
    location = "docker.io"          # where they really live (default: prefix)
    insecure = false                # plain HTTP (or unverified TLS)

    [[registry.mirror]]             # tried in order before the location
    location = "mirror.example.org:5000/dockerhub"

The first file found is used: ``$CAPSID_REGISTRIES_CONF``,
``~/.config/capsid/registries.conf``, ``/etc/capsid/registries.conf``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from capsid import config
from capsid.errors import CapsidError
from capsid.oci.reference import Reference

SYSTEM_PATH = Path("/etc/capsid/registries.conf")


class Endpoint:
    """One place to try for an image: a reference there, and how to speak to it."""

    __slots__ = ("insecure", "mirror", "ref")

    def __init__(self, ref: Reference, insecure: bool = False, mirror: bool = False) -> None:
        self.ref = ref
        self.insecure = insecure
        self.mirror = mirror

    def __repr__(self) -> str:
        return f"Endpoint({self.ref}, insecure={self.insecure}, mirror={self.mirror})"


class Registries:
    """The parsed settings."""

    def __init__(self, entries: list[dict[str, Any]] | None = None, source: str = "") -> None:
        self.entries = entries or []
        self.source = source

    @classmethod
    def load(cls) -> Registries:
        for path in candidates():
            if path.is_file():
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as err:
                    raise CapsidError(f"cannot read {path}: "
                                      f"{getattr(err, 'strerror', None) or 'it is not UTF-8'}",
                                      "fix the file or point CAPSID_REGISTRIES_CONF elsewhere"
                                      ) from None
                return cls.parse(text, str(path))
        return cls()

    @classmethod
    def parse(cls, text: str, source: str = "registries.conf") -> Registries:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CapsidError(f"{source} is not valid TOML ({e})",
                              "fix the file; see 'capsid pull --help' for its format") from None
        entries = data.get("registry") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise CapsidError(f"{source}: 'registry' must be a list of tables ([[registry]])",
                              "fix the file; see 'capsid pull --help' for its format")
        for entry in entries:
            if not (entry.get("prefix") or entry.get("location")):
                raise CapsidError(f"{source}: a [[registry]] entry has neither prefix nor "
                                  "location", "give each entry a prefix, e.g. \"docker.io\"")
        return cls(entries, source)

    def _match(self, ref: Reference) -> dict[str, Any] | None:
        """The entry with the longest prefix matching *ref*'s name."""
        name, best, best_len = ref.name, None, -1
        for entry in self.entries:
            prefix = str(entry.get("prefix") or entry.get("location")).rstrip("/")
            if (name == prefix or name.startswith(prefix + "/")) and len(prefix) > best_len:
                best, best_len = entry, len(prefix)
        return best

    def endpoints(self, ref: Reference, nohttps: bool = False) -> list[Endpoint]:
        """Where to look for *ref*: mirrors in order, then the registry itself."""
        entry = self._match(ref)
        if entry is None:
            return [Endpoint(ref, nohttps or self.insecure_host(ref.registry))]
        prefix = str(entry.get("prefix") or entry.get("location")).rstrip("/")
        rest = ref.name[len(prefix):].lstrip("/")

        def at(location: str) -> Reference:
            host, _, path = location.rstrip("/").partition("/")
            repo = f"{path}/{rest}" if path and rest else (path or rest)
            return Reference(host, repo, ref.tag, ref.digest)

        found = []
        for mirror in entry.get("mirror") or []:
            if not isinstance(mirror, dict) or not mirror.get("location"):
                continue
            if mirror.get("pull-from-mirror") == "digest-only" and not ref.digest:
                continue
            found.append(Endpoint(at(str(mirror["location"])),
                                  nohttps or bool(mirror.get("insecure")), mirror=True))
        if not entry.get("blocked"):
            location = str(entry.get("location") or prefix)
            found.append(Endpoint(at(location), nohttps or bool(entry.get("insecure"))))
        if not found:
            raise CapsidError(f"{ref.registry} is blocked by {self.source}",
                              "ask your site's administrators for a mirror")
        return found

    def insecure_host(self, host: str) -> bool:
        for entry in self.entries:
            location = str(entry.get("location") or entry.get("prefix") or "")
            if location.split("/", 1)[0] == host and entry.get("insecure"):
                return True
        return False


def candidates() -> list[Path]:
    paths = []
    explicit = config.env("REGISTRIES_CONF")
    if explicit:
        paths.append(Path(explicit))
    xdg = os.environ.get("XDG_CONFIG_HOME")
    paths.append((Path(xdg) if xdg else Path.home() / ".config") / "capsid" / "registries.conf")
    paths.append(SYSTEM_PATH)
    return paths
