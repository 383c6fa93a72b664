"""``capsid pull`` and ``capsid push``: images to and from registries."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from capsid import config
from capsid.cli.parser import from_variables, parser
from capsid.errors import UsageError

REGISTRIES_HELP = """\
Mirrors and plain-HTTP registries are set in registries.conf (TOML): the first of
$CAPSID_REGISTRIES_CONF, ~/.config/capsid/registries.conf, /etc/capsid/registries.conf:

  [[registry]]
  prefix = "docker.io"
  [[registry.mirror]]
  location = "mirror.example.org:5000"
"""


def _nohttps(args: object) -> bool:
    return bool(getattr(args, "nohttps", False)) or config.env_flag("NOHTTPS") \
        or config.env_flag("NO_HTTPS")


def run(verb: str, argv: list[str]) -> int:
    return pull(argv) if verb == "pull" else push(argv)


def pull(argv: list[str]) -> int:
    p = parser("pull", "[options] [OUTPUT.sif] URI",
               "Download an image and convert it to a SIF file: docker://REF, oras://REF, "
               "docker-archive:FILE, oci-archive:FILE or oci:DIR. Without OUTPUT the name "
               "is NAME_TAG.sif.")
    p.epilog = REGISTRIES_HELP
    p.add_argument("-F", "--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument("--arch", help="architecture to pull (amd64, arm64, arm/v7, …); "
                   "default: this machine's")
    p.add_argument("--nohttps", "--no-https", action="store_true",
                   help="talk plain HTTP to the registry")
    p.add_argument("--disable-cache", action="store_true",
                   help="do not keep the converted SIF in the cache")
    p.add_argument("--compression", default=os.environ.get("CAPSID_COMPRESSION", "zstd"),
                   help="squashfs compression: zstd (default), gzip, xz or lz4")
    p.add_argument("--name", metavar="NAME",
                   help="the output's name (instead of OUTPUT; relative to --dir if given)")
    p.add_argument("--dir", metavar="DIR", help="write the output into this directory")
    p.add_argument("-s", "--sandbox", action="store_true",
                   help="write a sandbox directory instead of a SIF file")
    from capsid.cli import compat

    compat.add_to(p, "pull")
    p.add_argument("args", nargs="+", metavar="[OUTPUT] URI")
    from capsid.cli import sign

    sign.add_signing(p)
    args = from_variables(p, p.parse_args(argv), {
        "arch": ("PULL_ARCH",), "name": ("PULL_NAME",), "dir": ("PULLDIR", "PULLFOLDER"),
        "disable_cache": ("DISABLE_CACHE",), "sandbox": ("SANDBOX",)})
    if len(args.args) > 2:
        raise UsageError("too many arguments", "usage: capsid pull [options] [OUTPUT.sif] URI")
    if len(args.args) == 2 and args.name:
        raise UsageError("both OUTPUT and --name given", "give one of them")
    from capsid.oci import sources

    uri = args.args[-1]
    if not sources.is_uri(uri):
        raise sources.not_an_image_uri(uri)
    name = args.args[0] if len(args.args) == 2 else args.name or sources.default_name(uri)
    if args.sandbox and len(args.args) == 1 and not args.name:
        name = name.removesuffix(".sif")
    out = Path(args.dir) / name if args.dir else Path(name)
    if args.dir and not os.path.isdir(args.dir):
        raise UsageError(f"--dir {args.dir}: no such directory", "create it first")
    opts = sources.Options(args.arch, _nohttps(args), args.compression, args.disable_cache)
    if args.sandbox:
        sources.to_sandbox(uri, out, opts, force=args.force)
        return 0
    sources.to_sif(uri, out, opts, force=args.force)
    if uri.startswith("oras://"):
        sign.check_pulled(out)
    sign.sign_output(out, args)
    return 0


def push(argv: list[str]) -> int:
    p = parser("push", "[options] IMAGE.sif URI",
               "Upload a SIF: oras://REF stores the file as Apptainer does; docker://REF "
               "stores its root filesystem as a one-layer OCI image that Docker and Podman run.")
    p.add_argument("--nohttps", "--no-https", action="store_true",
                   help="talk plain HTTP to the registry")
    p.add_argument("image")
    p.add_argument("uri")
    from capsid.cli import compat

    compat.add_to(p, "push")
    args = p.parse_args(argv)
    if args.uri.startswith("docker://"):
        from capsid.runtime import identity, userns

        # a built image's layers are read from the build cache as the build wrote them:
        # in its user namespace (subordinate ids, or root's build range)
        userns.enter_for_build(identity.User.current())
    from capsid.oci import push as pusher
    from capsid.oci import reference
    from capsid.oci.registries import Registries
    from capsid.oci.registry import Client

    image = Path(args.image)
    scheme, sep, rest = args.uri.partition("://")
    if not sep or scheme not in ("oras", "docker"):
        raise UsageError(f"cannot push to {args.uri!r}", "push to oras://REF or docker://REF")
    ref = reference.parse(rest)
    insecure = _nohttps(args) or Registries.load().insecure_host(ref.registry)
    with Client() as client:
        if scheme == "oras":
            digest = pusher.push_oras(client, image, ref, insecure)
        else:
            from capsid.build import record
            from capsid.image.locate import SIF, locate

            built = record.layers_of(image) if locate(image).kind == SIF else None
            digest = pusher.push_docker(client, image, ref, insecure, built)
    sys.stderr.write(f"pushed {image} to {scheme}://{ref} ({digest})\n")
    return 0
