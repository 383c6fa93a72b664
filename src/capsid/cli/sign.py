"""``capsid sign``, ``verify``, ``key`` and ``keyserver``: Apptainer's signing commands.

Flags follow Apptainer's: ``sign --keyidx N --sif-id ID --group-id ID --all``,
``verify --key --local --all --json --sif-id --group-id``, ``key newpair|list|import|
export|remove`` with ``--secret`` and ``--armor``; ``sign --key``/``verify --key`` take PEM
keys (DSSE signatures). Keyservers are not offered: that says so in one line, with what
to do instead.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from capsid.cli.parser import from_variables, parser
from capsid.cli.sif import object_id as parse_id
from capsid.errors import CapsidError, UsageError
from capsid.signing import keyring
from capsid.signing.openpgp import Key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.signing.sifsign import Verification


def _image(path: str) -> Path:
    image = Path(path)
    if not image.is_file():
        raise UsageError(f"{path} is not a SIF file", "give the path of a SIF image")
    return image


def _secret_key(index: int | None) -> Key:
    keys = keyring.load(keyring.SECRET)
    where = keyring.location(keyring.SECRET)
    if not keys:
        raise UsageError(f"there is no secret key in {where}",
                         "make one with 'capsid key newpair' or import one with "
                         "'capsid key import FILE'")
    if index is None:
        if len(keys) > 1:
            raise UsageError(f"{where} holds {len(keys)} secret keys",
                             "choose one with --keyidx N (see 'capsid key list --secret')")
        index = 0
    if not 0 <= index < len(keys):
        raise UsageError(f"there is no key {index} in {where}",
                         "see 'capsid key list --secret' for the indices")
    return keys[index]


def _passphrase(key: Key) -> str | None:
    env = os.environ.get("CAPSID_SIGN_PASSPHRASE") or os.environ.get(
        "APPTAINER_SIGN_PASSPHRASE")
    if env is not None:
        return env
    try:
        key.secret.signer(None)
        return None
    except Exception as err:  # protected: ask, where someone can answer
        reason = (str(err).splitlines() or [""])[0]
        if "password" not in reason.lower() and "encrypt" not in reason.lower():
            raise CapsidError(f"cannot sign with key {key.fingerprint}: {reason}",
                              "check that it can sign and has not expired, or choose "
                              "another with --keyidx") from None
        if not sys.stdin.isatty():
            raise UsageError(f"key {key.fingerprint} is protected by a passphrase",
                             "set CAPSID_SIGN_PASSPHRASE, or sign from a terminal") from None
        return getpass.getpass(f"Passphrase for key {key.fingerprint}: ")


def sign(argv: list[str]) -> int:
    from capsid.signing import sifsign

    p = parser("sign", "[--keyidx N | --key PRIVATE.pem] [--sif-id ID | --group-id ID | --all] "
               "IMAGE.sif",
               "Add a signature to a SIF image for each object group, as Apptainer's sign "
               "does (verified by 'apptainer verify' and 'capsid verify'): OpenPGP with a key "
               "of your keyring, or a DSSE envelope with a PEM private key (--key).")
    p.add_argument("-k", "--keyidx", help="the secret key to use (see 'capsid key list "
                   "--secret')")
    p.add_argument("-i", "--sif-id", "--id", help="sign only this object")
    p.add_argument("-g", "--group-id", "--groupid", help="sign only this object group")
    p.add_argument("-a", "--all", action="store_true", help="sign every object group (the "
                   "default)")
    p.add_argument("--key", help="sign with this PEM private key (RSA, ECDSA or Ed25519)")
    p.add_argument("image")
    args = from_variables(p, p.parse_args(argv), {"key": ("SIGN_KEY",)})
    if args.key and args.keyidx is not None:
        raise UsageError("--key and --keyidx cannot be used together",
                         "sign with a PEM key (--key) or a key of your keyring (--keyidx)")
    if args.sif_id and args.group_id:
        raise UsageError("--sif-id and --group-id cannot be used together",
                         "choose one object or one group")
    index = None
    if args.keyidx is not None:
        if not args.keyidx.isdigit():
            raise UsageError(f"--keyidx {args.keyidx!r} is not a number",
                             "see 'capsid key list --secret' for the indices")
        index = int(args.keyidx)
    image = _image(args.image)
    group = parse_id(args.group_id) if args.group_id else None
    object_id = parse_id(args.sif_id) if args.sif_id else None
    if args.key:
        from capsid.signing import dsse

        added = sifsign.sign(image, None, pem=dsse.load_private(args.key), group=group,
                             object_id=object_id)
        signer = f"PEM key {args.key}"
    else:
        key = _secret_key(index)
        added = sifsign.sign(image, key, password=_passphrase(key), group=group,
                             object_id=object_id)
        signer = f"key {key.fingerprint}"
    print(f"Signature created and applied to image '{image}' (object "
          f"{', '.join(map(str, added))}, {signer})", file=sys.stderr)
    return 0


def add_signing(p: Any) -> None:
    """``--sign``, ``--keyidx`` and ``--key`` for commands that write a SIF (build, pull)."""
    group = p.add_argument_group("signing the output")
    group.add_argument("--sign", action="store_true",
                       help="sign the SIF written (with your only secret key, or --keyidx)")
    group.add_argument("--keyidx", help="the secret key to sign with (implies --sign)")
    group.add_argument("--key", dest="sign_key", metavar="PRIVATE.pem",
                       help="sign with this PEM private key (implies --sign)")


def sign_output(out: Path, args: Any) -> None:
    """Sign the SIF a build or pull wrote, if its options ask for it."""
    if not (args.sign or args.keyidx is not None or args.sign_key):
        return
    argv = [*(["--keyidx", args.keyidx] if args.keyidx is not None else []),
            *(["--key", args.sign_key] if args.sign_key else []), str(out)]
    sign(argv)


def check_pulled(out: Path) -> None:
    """A SIF fetched as it was stored (oras://) that carries signatures must verify: a
    signature that does not is a tampered image, removed again."""
    from capsid.image import sif
    from capsid.image.output import remove
    from capsid.signing import sifsign

    with sif.SifImage(out) as image:
        if image.find(sif.DataType.SIGNATURE) is None:
            return
    result = sifsign.verify(out, keyring.load(keyring.PUBLIC))
    bad = [s for s in result.signatures if s.tampered]
    if bad or result.problems:
        remove(out)
        why = bad[0].error if bad else result.problems[0]
        raise CapsidError(f"the image pulled does not match its signature ({why}); it was "
                          "removed", "check where it comes from; pull it again")
    for s in result.signatures:
        state = "verified" if s.ok else f"not verified: {s.error}"
        print(f"signature {s.id} (key {s.fingerprint or 'PEM'}): {state}", file=sys.stderr)


def verify(argv: list[str]) -> int:
    from capsid.signing import sifsign

    p = parser("verify", "[--key PUBLIC.pem] [--local] [--all] [--json] "
               "[--sif-id ID | --group-id ID] IMAGE.sif",
               "Check an image's signatures against the public keys of your keyring: every "
               "signed object must be as it was signed.")
    p.add_argument("-l", "--local", action="store_true",
                   help="only the local keyring (capsid has no keyserver: always)")
    p.add_argument("-a", "--all", action="store_true", help="every object group (the default)")
    p.add_argument("-j", "--json", action="store_true", help="the result as JSON")
    p.add_argument("-i", "--sif-id", "--id", help="verify only this object")
    p.add_argument("-g", "--group-id", "--groupid", help="verify only this object group")
    p.add_argument("--legacy-insecure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--key", help="also verify DSSE signatures with this PEM public key")
    p.add_argument("image")
    from capsid.cli import compat

    compat.add_to(p, "verify")
    args = from_variables(p, p.parse_args(argv), {"key": ("VERIFY_KEY",),
                                                  "local": ("LOCAL_VERIFY",)})
    if args.legacy_insecure:
        raise UsageError("legacy signatures (SIFHASH, Singularity 3.5 and older) are not "
                         "verified by capsid", "sign the image again with a current key")
    image = _image(args.image)
    keys = keyring.load(keyring.PUBLIC)
    pem = []
    if args.key:
        from capsid.signing import dsse

        pem.append(dsse.load_public(args.key))
    result = sifsign.verify(image, keys,
                            group=parse_id(args.group_id) if args.group_id else None,
                            object_id=parse_id(args.sif_id) if args.sif_id else None,
                            pem=pem)
    if args.json:
        print(json.dumps({
            "image": str(image), "verified": result.ok, "problems": result.problems,
            "signatures": [{"id": s.id, "group": s.group, "fingerprint": s.fingerprint,
                            "signer": s.signer, "objects": s.objects, "ok": s.ok,
                            "error": s.error} for s in result.signatures]}, indent=2))
    else:
        _report(result)
    if not result.ok:
        first = next((s.error for s in result.signatures if s.error), None) \
            or (result.problems[0] if result.problems else "no signature")
        raise CapsidError(f"{image}: {first}",
                          "do not trust this image; get it again from its signer")
    return 0


def _report(result: Verification) -> None:
    print(f"Verifying image: {result.path}", file=sys.stderr)
    for s in result.signatures:
        if s.ok:
            print(f"[LOCAL]   Signing entity: {', '.join(s.signer) or '(no user ID)'}")
            print(f"[LOCAL]   Fingerprint: {s.fingerprint}")
            print(f"Objects verified (group {s.group}): {' '.join(map(str, s.objects))}")
        else:
            print(f"[LOCAL]   Signature {s.id} (group {s.group}, key {s.fingerprint}) "
                  f"FAILED: {s.error}")
    for problem in result.problems:
        print(f"FAILED: {problem}")
    if result.ok:
        print(f"Verified signature(s) from image '{result.path}'", file=sys.stderr)


def _describe(index: int, key: Key) -> str:
    created = ""
    when = key.expiration
    if isinstance(when, datetime.datetime):
        created = f"\n   Expires:           {when:%Y-%m-%d %H:%M:%S %Z}"
    state = " (revoked)" if key.revoked else " (expired)" if key.expired else ""
    return (f"{index}) User:              {', '.join(key.user_ids) or '(none)'}{state}"
            f"{created}\n   Fingerprint:       {key.fingerprint}\n")


def key(argv: list[str]) -> int:
    p = parser("key", "<newpair|list|import|export|remove> ...",
               "Manage your OpenPGP keys for signing and verifying images (Apptainer's "
               "keyring layout; Apptainer's keyring is read while capsid has none).")
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True, prog=p.prog)
    new = sub.add_parser("newpair", help="make a new key pair")
    new.add_argument("-N", "--name")
    new.add_argument("-E", "--email")
    new.add_argument("-C", "--comment")
    new.add_argument("-P", "--password", help=argparse.SUPPRESS)
    new.add_argument("-b", "--bit-length", type=int, default=4096)
    new.add_argument("-U", "--push", nargs="?", const="true", default=None,
                     help=argparse.SUPPRESS)  # Apptainer's is a switch (--push=false too)
    lst = sub.add_parser("list", help="list the keys of the keyring")
    lst.add_argument("-s", "--secret", action="store_true")
    imp = sub.add_parser("import", help="add the keys of a file (public or secret)")
    imp.add_argument("file")
    from capsid.cli import compat

    compat.add_to(imp, "key import")
    exp = sub.add_parser("export", help="write a key to a file")
    exp.add_argument("-s", "--secret", action="store_true")
    exp.add_argument("-a", "--armor", action="store_true")
    exp.add_argument("fingerprint")
    exp.add_argument("file")
    rem = sub.add_parser("remove", help="remove a public key")
    rem.add_argument("-s", "--secret", action="store_true")
    rem.add_argument("fingerprint")
    for name in ("search", "pull", "push"):
        offline = sub.add_parser(name, help="(needs a keyserver)")
        offline.add_argument("rest", nargs="*")
    args = p.parse_args(argv)
    if args.action in ("search", "pull", "push"):
        return keyserver([args.action])
    if args.action == "newpair":
        return _newpair(args)
    if args.action == "list":
        kind = keyring.SECRET if args.secret else keyring.PUBLIC
        print(f"{'Private' if args.secret else 'Public'} key listing "
              f"({keyring.location(kind)}):\n")
        for index, k in enumerate(keyring.load(kind)):
            print(_describe(index, k))
        return 0
    if args.action == "import":
        return _import(Path(args.file))
    if args.action == "export":
        return _export(args.fingerprint, Path(args.file), args.secret, args.armor)
    return _remove(args.fingerprint, args.secret)


def _find(fingerprint: str, keys: list[Key]) -> int:
    wanted = fingerprint.replace(" ", "").upper()
    matches = [i for i, k in enumerate(keys) if k.fingerprint.endswith(wanted) and
               len(wanted) >= 8]
    if len(matches) != 1:
        raise UsageError(f"{'no' if not matches else 'more than one'} key matches "
                         f"{fingerprint!r}", "give the whole fingerprint, as 'capsid key "
                         "list' shows it")
    return matches[0]


def _newpair(args: object) -> int:
    from capsid.signing import openpgp

    name = getattr(args, "name", None)
    email = getattr(args, "email", None)
    comment = getattr(args, "comment", None)
    if getattr(args, "password", None):
        raise UsageError("capsid cannot protect a new key with a passphrase yet",
                         "omit --password: the key is kept in a file only you can read "
                         "(mode 0600)")
    if getattr(args, "push", None) not in (None, "false", "0", "no"):
        raise UsageError("capsid has no keyserver to push to",
                         "share the public key with 'capsid key export --armor'")
    if not name and sys.stdin.isatty():
        name = input("Enter your name (e.g., John Doe) : ").strip()
        email = email or input("Enter your email address (e.g., john.doe@example.com) : "
                               ).strip()
        comment = comment or input("Enter optional comment (e.g., development keys) : "
                                   ).strip()
    if not name:
        raise UsageError("a new key needs a name", "give --name (and --email)")
    user_id = name + (f" ({comment})" if comment else "") + (f" <{email}>" if email else "")
    print("Generating key pair...", file=sys.stderr)
    made = openpgp.generate(user_id, getattr(args, "bit_length", 4096))
    for kind in (keyring.SECRET, keyring.PUBLIC):
        keys, _ = keyring.merged(keyring.load(kind), [made])
        keyring.save(kind, keys)
    print(f"Key created: {made.fingerprint} {user_id}", file=sys.stderr)
    return 0


def _import(path: Path) -> int:
    from capsid.image.locate import read_limited
    from capsid.signing import openpgp

    data = read_limited(str(path), "key file", "give a file of exported keys")
    new = openpgp.parse(data, str(path))
    if not new:
        raise UsageError(f"{path} holds no OpenPGP key", "export the key armored and retry")
    public, added = keyring.merged(keyring.load(keyring.PUBLIC), new)
    keyring.save(keyring.PUBLIC, public)
    secret = [k for k in new if k.secret is not None]
    if secret:
        keys, _ = keyring.merged(keyring.load(keyring.SECRET), secret)
        keyring.save(keyring.SECRET, keys)
    for k in new:
        kind = "secret and public" if k.secret is not None else "public"
        print(f"Key with fingerprint {k.fingerprint} ({kind}) "
              f"{'added' if k in added or k.secret else 'already there'}", file=sys.stderr)
    return 0


def _export(fingerprint: str, out: Path, secret: bool, armored: bool) -> int:
    from capsid.image import output
    from capsid.signing import openpgp

    kind = keyring.SECRET if secret else keyring.PUBLIC
    keys = keyring.load(kind)
    k = keys[_find(fingerprint, keys)]
    data = k.secret_bytes() if secret else k.public_bytes()
    if armored:
        data = openpgp.armor(data, secret)
    with output.atomic_file(out, force=True, mode=0o600 if secret else 0o644) as tmp:
        tmp.write_bytes(data)
    print(f"Key {k.fingerprint} exported to {out}", file=sys.stderr)
    return 0


def _remove(fingerprint: str, secret: bool) -> int:
    kind = keyring.SECRET if secret else keyring.PUBLIC
    keys = keyring.load(kind)
    index = _find(fingerprint, keys)
    removed = keys.pop(index)
    keyring.save(kind, keys)
    print(f"Key {removed.fingerprint} removed from the {'secret' if secret else 'public'} "
          "keyring", file=sys.stderr)
    return 0


def keyserver(argv: list[str]) -> int:
    raise UsageError("capsid has no keyserver client: keys are shared as files",
                     "export a key with 'capsid key export --armor FINGERPRINT FILE' and "
                     "import it with 'capsid key import FILE'")


def run(verb: str, argv: list[str]) -> int:
    if verb == "sign":
        return sign(argv)
    if verb == "verify":
        return verify(argv)
    if verb == "key":
        return key(argv)
    return keyserver(argv)
