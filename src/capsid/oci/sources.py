"""Image URIs capsid understands, and turning each into a SIF.

``docker://REF`` (a registry, through the cache), ``docker-archive:PATH[:TAG]``,
``oci-archive:PATH[:TAG]``, ``oci:DIR[:TAG]`` (each also with ``://``) and
``oras://REF`` (a SIF stored in a registry), ``http(s)://URL`` (a SIF file on a web
server, downloaded as it is).
"""

from __future__ import annotations

from pathlib import Path

from capsid import log
from capsid.errors import UsageError
from capsid.image import output
from capsid.oci import archive, image, reference

LOG = log.get(__name__)

SCHEMES = ("docker", "docker-archive", "oci-archive", "oci", "oras", "http", "https")


def split(uri: str) -> tuple[str, str] | None:
    """(scheme, rest) if *uri* names one of :data:`SCHEMES`, else None."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in SCHEMES:
        return None
    return scheme, rest[2:] if rest.startswith("//") else rest


def is_uri(text: str) -> bool:
    return split(text) is not None


def not_an_image_uri(text: str) -> UsageError:
    """The one error for *text* given where an image URI belongs."""
    from capsid.image.locate import foreign_source

    return foreign_source(text) or UsageError(
        f"{text!r} is not an image URI",
        "write e.g. docker://python:3.12, oras://REGISTRY/NAME:TAG or docker-archive:image.tar")


class Options:
    """What pull and build share: platform, transport, compression, cache use."""

    def __init__(self, arch: str | None = None, nohttps: bool = False,
                 compression: str = "zstd", disable_cache: bool = False) -> None:
        self.platform = image.parse_platform(arch)
        self.nohttps = nohttps
        self.compression = compression
        self.disable_cache = disable_cache


def to_sif(uri: str, out: Path, opts: Options, force: bool = False) -> None:
    """Write SIF *out* from *uri*."""
    from capsid.oci import tosif

    parsed = split(uri)
    if parsed is None:
        raise not_an_image_uri(uri)
    scheme, rest = parsed
    if scheme in ("docker-archive", "oci-archive", "oci"):
        tosif.write_sif(_archive(scheme, rest, opts), out, compression=opts.compression,
                        force=force)
    elif scheme == "docker":
        output.check_target(out, force)
        from capsid.oci.pull import Puller

        ref = reference.parse(rest)
        with Puller(nohttps=opts.nohttps) as puller:
            if opts.disable_cache:
                source = puller.fetch(puller.resolve(ref, opts.platform))
                tosif.write_sif(source, out, compression=opts.compression, force=force,
                                verified=True)
                return
            cached = puller.cached_sif(ref, opts.platform, opts.compression)
            # made just now: the output may be the same file, with the pull's time and mode
            output.place(cached, out, force, share=cached in puller.made)
    elif scheme in ("http", "https"):
        pull_url(uri, out, force)
    else:
        pull_oras(reference.parse(rest), out, opts, force)


def to_sandbox(uri: str, out: Path, opts: Options, force: bool = False) -> None:
    """Unpack *uri* into sandbox directory *out*, straight from its layers (an
    ``oras://`` SIF is fetched, then unpacked)."""
    from capsid.oci import tosif

    parsed = split(uri)
    if parsed is None:
        raise not_an_image_uri(uri)
    scheme, rest = parsed
    output.check_target(out, force)
    if scheme in ("docker-archive", "oci-archive", "oci"):
        tosif.write_sandbox(_archive(scheme, rest, opts), out, force=force)
    elif scheme == "docker":
        from capsid.oci.pull import Puller

        with Puller(nohttps=opts.nohttps) as puller:
            source = puller.fetch(puller.resolve(reference.parse(rest), opts.platform))
            tosif.write_sandbox(source, out, force=force, verified=True)
    else:
        from capsid.image import convert

        with output.scratch(out, "sif") as image:
            if scheme in ("http", "https"):
                pull_url(uri, image, True)
            else:
                pull_oras(reference.parse(rest), image, opts, True)
            convert.image_to_sandbox(image, out, force=force)


def pull_oras(ref: reference.Reference, out: Path, opts: Options, force: bool) -> None:
    """Fetch the SIF stored as an ORAS artifact at *ref*."""
    from capsid.oci.pull import Puller

    output.check_target(out, force)
    with Puller(nohttps=opts.nohttps) as puller:
        blob = puller.oras_sif(ref, opts.platform)
    with output.atomic_file(out, force) as tmp:
        output.copy_file(blob, tmp)


def pull_url(url: str, out: Path, force: bool) -> None:
    """Download the SIF (or squashfs) image at http(s) *url* to *out*, as it is."""
    from capsid.errors import CapsidError, ImageFormatError
    from capsid.image.locate import SIF, SQUASHFS, locate
    from capsid.oci.registry import Client

    with output.atomic_file(out, force) as tmp:
        with Client() as client, open(tmp, "wb") as f:
            client.download(url, f)
        try:
            kind = locate(str(tmp)).kind
        except CapsidError:
            kind = ""
        if kind not in (SIF, SQUASHFS):
            raise ImageFormatError(f"{url} is not a SIF or squashfs image",
                                   "check the address; for a container image in a registry, "
                                   "use docker:// or oras://")


def default_name(uri: str) -> str:
    """Apptainer's default output name for ``pull``: ``NAME_TAG.sif``."""
    parsed = split(uri)
    if parsed and parsed[0] in ("docker", "oras"):
        return reference.parse(parsed[1]).sif_name()
    if parsed and parsed[0] in ("http", "https"):
        from urllib.parse import urlsplit

        return Path(urlsplit(uri).path).name or "image.sif"
    if parsed:
        stem = Path(archive.split_ref(parsed[1])[0]).name
        return stem.split(".", 1)[0] + ".sif" if stem else "image.sif"
    raise not_an_image_uri(uri)


def cached_for_run(uri: str, nohttps: bool = False) -> str:
    """The cached SIF to run for a ``docker://``, ``oras://``, ``docker-archive:``,
    ``oci-archive:`` or ``oci:`` image, converted once (over plain HTTP with *nohttps*,
    or where the variables ask for it)."""
    scheme, rest = split(uri) or ("", uri)
    opts = Options(nohttps=nohttps or _env_nohttps())
    if scheme not in ("docker", "oras"):
        from capsid.oci.store import Store

        source = _archive(scheme, rest, opts)

        def make(out: Path) -> None:
            from capsid.oci import tosif  # only now: most starts find the SIF made

            tosif.write_sif(source, out, compression=opts.compression, force=True)

        return str(Store().prepare().converted(source.identity(), opts.compression, make)[0])
    from capsid.oci.pull import Puller

    ref = reference.parse(rest)
    with Puller(nohttps=opts.nohttps) as puller:
        if scheme == "oras":
            return str(puller.oras_sif(ref, opts.platform))
        return str(puller.cached_sif(ref, opts.platform))


def _archive(scheme: str, rest: str, opts: Options) -> image.SourceImage:
    """The image in a ``docker-archive:``, ``oci-archive:`` or ``oci:`` source."""
    if scheme == "docker-archive":
        return archive.docker_archive(rest, opts.platform)
    return archive.oci_layout(rest, opts.platform, f"{scheme}:")


def _env_nohttps() -> bool:
    from capsid import config

    return config.env_flag("NOHTTPS") or config.env_flag("NO_HTTPS")
