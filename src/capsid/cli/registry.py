"""``capsid registry login|logout|list``: credentials for registries."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from capsid.cli.parser import from_variables, parser
from capsid.errors import UsageError


def _host(text: str) -> str:
    for prefix in ("docker://", "oras://", "https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    host = text.split("/", 1)[0]
    if not host:
        raise UsageError("no registry given", "usage: capsid registry login [-u USER] HOST")
    from capsid.oci.reference import hub_alias

    return hub_alias(host)


def run(verb: str, argv: list[str]) -> int:
    p = parser("registry", "login|logout [options] REGISTRY | list",
               "Store, forget or list the usernames and passwords for registries, in a "
               "Docker config.json-style file (default ~/.config/capsid/auth.json, mode "
               "0600); list shows the logins capsid uses, from that file, podman's and "
               "Docker's.")
    p.add_argument("action", choices=("login", "logout", "list"))
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--authfile", help="credentials file to write instead of the default")
    p.add_argument("--nohttps", "--no-https", action="store_true",
                   help="check the credentials over plain HTTP")
    p.add_argument("registry", nargs="?")
    from capsid.cli import compat

    compat.add_to(p, "registry")
    args = from_variables(p, p.parse_intermixed_args(argv),  # REGISTRY may follow options
                          {"username": ("LOGIN_USERNAME",), "password": ("LOGIN_PASSWORD",)})
    from capsid.oci import auth

    path = Path(args.authfile) if args.authfile else None
    if args.action == "list":
        return _list(auth.logins(path))
    if not args.registry:
        raise UsageError(f"registry {args.action} needs a registry",
                         f"e.g. capsid registry {args.action} docker://ghcr.io")
    host = _host(args.registry)
    if args.action == "logout":
        if not auth.remove(host, path):
            raise UsageError(f"not logged in to {host}", "nothing to do")
        sys.stderr.write(f"removed the credentials for {host}\n")
        return 0
    try:
        username = args.username or input("Username: ")
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = args.password if args.password is not None else getpass.getpass()
    except EOFError:  # no terminal, and nothing on standard input
        raise UsageError("no username or password given, and standard input ended",
                         "give -u USER and the password on standard input with "
                         "--password-stdin") from None
    if not username or not password:
        raise UsageError("a username and a password are needed",
                         "give -u USER and --password-stdin")
    _check(host, username, password, args.nohttps)
    written = auth.store(host, username, password, path)
    sys.stderr.write(f"login to {host} succeeded; credentials saved in {written}\n")
    return 0


def _list(logins: list[tuple[str, str, Path]]) -> int:
    if not logins:
        sys.stderr.write("no registry logins; add one with 'capsid registry login "
                         "docker://HOST'\n")
        return 0
    width = max(len("REGISTRY"), *(len(host) for host, _, _ in logins))
    users = max(len("USERNAME"), *(len(user) for _, user, _ in logins))
    sys.stdout.write(f"{'REGISTRY':<{width}}  {'USERNAME':<{users}}  FILE\n")
    for host, user, path in logins:
        sys.stdout.write(f"{host:<{width}}  {user:<{users}}  {path}\n")
    return 0


def _check(host: str, username: str, password: str, nohttps: bool) -> None:
    """Try the credentials against the registry before saving them."""
    from capsid.oci import reference
    from capsid.oci.registries import Endpoint, Registries
    from capsid.oci.registry import Client

    insecure = nohttps or Registries.load().insecure_host(host)
    with Client() as client:
        client.check_login(Endpoint(reference.Reference(host, "login"), insecure), username,
                           password)
