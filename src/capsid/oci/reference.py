"""Image references (``python``, ``ghcr.io/org/app:1.2``, ``host:5000/x@sha256:…``).

Parsed and normalised the way Docker does it: a first component with a dot,
a colon or ``localhost`` is a registry; otherwise the registry is
``docker.io`` and one-component names live under ``library/``.
"""

from __future__ import annotations

import re

from capsid.errors import UsageError

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API actually answers.
DOCKER_HUB_API = "registry-1.docker.io"
#: Docker Hub's other names (and, first, the key Docker's config.json keeps its login under)
DOCKER_HUB_ALIASES = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB_API)


def hub_alias(host: str) -> str:
    """*host*, or docker.io where it is another of Docker Hub's names."""
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


class Reference:
    """A normalised reference: registry, repository, tag and/or digest."""

    __slots__ = ("digest", "registry", "repository", "tag")

    def __init__(self, registry: str, repository: str, tag: str | None = None,
                 digest: str | None = None) -> None:
        self.registry = registry
        self.repository = repository
        self.tag = tag
        self.digest = digest

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def __repr__(self) -> str:
        return f"Reference({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def with_registry(self, location: str) -> Reference:
        """The same image under *location* (``host[:port][/namespace]``), as for a mirror."""
        host, _, prefix = location.partition("/")
        repository = f"{prefix.strip('/')}/{self.repository}" if prefix else self.repository
        return Reference(host, repository, self.tag, self.digest)

    def sif_name(self) -> str:
        """Apptainer's default file name for ``pull``: ``NAME_TAG.sif``."""
        base = self.repository.rsplit("/", 1)[-1]
        if self.digest and not self.tag:
            return f"{base}_{self.digest.split(':', 1)[-1]}.sif"
        return f"{base}_{self.tag or 'latest'}.sif"


def parse(text: str) -> Reference:
    """Parse *text* (without a ``docker://`` prefix) into a normalised Reference."""
    original = text
    text = text.strip()
    for prefix in ("docker://", "oras://", "//"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if not text:
        raise _bad(original, "it is empty")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise _bad(original, f"{digest!r} is not a digest such as sha256:<64 hex digits>")
        algorithm, _, hexpart = digest.partition(":")
        if algorithm == "sha256" and len(hexpart) != 64:
            raise _bad(original, "a sha256 digest has 64 hex digits")
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise _bad(original, f"{tag!r} is not a valid tag")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = first, rest
        if not _DOMAIN.fullmatch(registry):
            raise _bad(original, f"{registry!r} is not a registry host name")
    else:
        registry, repository = DOCKER_HUB, text
    registry = hub_alias(registry)
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if repository != repository.lower():
        raise _bad(original, "repository names must be lowercase")
    if not _NAME.fullmatch(repository):
        raise _bad(original, f"{repository!r} is not a valid repository name")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"invalid image reference {text!r}: {why}",
                      "write it as [REGISTRY[:PORT]/]NAME[:TAG][@sha256:DIGEST]")
