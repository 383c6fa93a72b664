"""``capsid registry login|logout``: credentials for registries."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from capsid.cli.parser import parser
from capsid.errors import UsageError


def _host(text: str) -> str:
    for prefix in ("docker://", "oras://", "https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    host = text.split("/", 1)[0]
    if not host:
        raise UsageError("no registry given", "usage: capsid registry login [-u USER] HOST")
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


def run(verb: str, argv: list[str]) -> int:
    p = parser("registry", "login|logout [options] REGISTRY",
               "Store or forget the username and password for a registry, in a Docker "
               "config.json-style file (default ~/.config/capsid/auth.json, mode 0600).")
    p.add_argument("action", choices=("login", "logout"))
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--authfile", help="credentials file to write instead of the default")
    p.add_argument("--nohttps", "--no-https", action="store_true",
                   help="check the credentials over plain HTTP")
    p.add_argument("registry")
    args = p.parse_args(argv)
    from capsid.oci import auth

    host = _host(args.registry)
    path = Path(args.authfile) if args.authfile else None
    if args.action == "logout":
        if not auth.remove(host, path):
            raise UsageError(f"not logged in to {host}", "nothing to do")
        sys.stderr.write(f"removed the credentials for {host}\n")
        return 0
    username = args.username or input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = args.password if args.password is not None else getpass.getpass()
    if not username or not password:
        raise UsageError("a username and a password are needed",
                         "give -u USER and --password-stdin")
    _check(host, username, password, args.nohttps)
    written = auth.store(host, username, password, path)
    sys.stderr.write(f"login to {host} succeeded; credentials saved in {written}\n")
    return 0


def _check(host: str, username: str, password: str, nohttps: bool) -> None:
    """Try the credentials against the registry's /v2/ endpoint before saving them."""
    import base64

    from capsid.errors import CapsidError
    from capsid.oci import reference
    from capsid.oci.registries import Endpoint, Registries
    from capsid.oci.registry import Client

    insecure = nohttps or Registries.load().insecure_host(host)
    ep = Endpoint(reference.Reference(host, "capsid-login-check"), insecure)
    with Client() as client:
        url = f"{client.base_url(ep)}/v2/"
        basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        response = client._send("GET", url, headers={"Authorization": basic}, host=host)
        if response.status_code == 401 and "bearer" in \
                response.headers.get("www-authenticate", "").lower():
            import os

            os.environ["CAPSID_DOCKER_USERNAME"] = username
            os.environ["CAPSID_DOCKER_PASSWORD"] = password
            try:
                client._authenticate(host, response.headers["www-authenticate"], "")
            finally:
                del os.environ["CAPSID_DOCKER_USERNAME"], os.environ["CAPSID_DOCKER_PASSWORD"]
            return
        if response.status_code in (401, 403):
            raise CapsidError(f"{host} rejected the username or password",
                              "check them and try again")
