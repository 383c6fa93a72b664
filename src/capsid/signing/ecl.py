"""A site's execution control list: which SIF images may run, by who signed them.

The file is Apptainer's ``ecl.toml`` (capsid reads ``ecl file`` from the site
configuration, default ``/etc/capsid/ecl.toml``)::

    activated = true
    [[execgroup]]
      tagname = "production"
      mode = "whitestrict"          # whitelist | whitestrict | blacklist
      dirpath = "/opt/images"       # the images directly in it; "" for any other
      keyfp = ["12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"]

An image belongs to the group whose ``dirpath`` is its directory, else to the group
with an empty one, else to none (and may not run). Every signature must verify against
the site's keyring (``global keyring``, default ``/etc/capsid/global-pgp-public``, or
Apptainer's), every object group must be signed, and then: ``whitelist`` needs one listed
key to have signed every group, ``whitestrict`` all of them, ``blacklist`` none of them
to have signed anything. The check runs before anything is mounted.

capsid runs as the user, so this is the site's policy for its own ``capsid``, as in
Apptainer's unprivileged installations: whoever can run another program can read the
image another way. Sites that need enforcement keep images where only the runtime can
read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from capsid.config import SiteConfig
from capsid.errors import CapsidError

DEFAULT_FILE = "/etc/capsid/ecl.toml"
DEFAULT_KEYRING = "/etc/capsid/global-pgp-public"
APPTAINER_KEYRING = "/etc/apptainer/global-pgp-public"
MODES = ("whitelist", "whitestrict", "blacklist")


class Refused(CapsidError):
    """The execution control list does not let this image run."""

    def __init__(self, image: str, why: str) -> None:
        super().__init__(f"{image} may not run here: {why}",
                         "use an image signed as the site's execution control list requires, "
                         "or ask the site's administrators")


@dataclass(frozen=True)
class Group:
    tag: str
    mode: str
    directory: str
    keys: frozenset[str]


def _bad(path: str, why: str) -> CapsidError:
    return CapsidError(f"the execution control list {path} is invalid: {why}",
                       "ask the site's administrators to fix it")


def load(path: str) -> list[Group] | None:
    """The groups of an activated list at *path*; None where it is absent or off."""
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise _bad(path, str(err)) from None
    if doc.get("activated") is not True:
        return None
    groups, seen = [], set()
    for raw in doc.get("execgroup") or []:
        if not isinstance(raw, dict):
            raise _bad(path, "an execgroup is not a table")
        mode, directory = raw.get("mode"), raw.get("dirpath", "")
        keys = raw.get("keyfp") or []
        if mode not in MODES:
            raise _bad(path, f"mode {mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(directory, str) or directory in seen:
            raise _bad(path, f"dirpath {directory!r} is not a path, or appears twice")
        if directory and os.path.realpath(directory) != directory:
            raise _bad(path, f"dirpath {directory!r} is not absolute with its links resolved")
        if not isinstance(keys, list) or not all(
                isinstance(k, str) and len(k) == 40 and
                all(c in "0123456789abcdefABCDEF" for c in k) for k in keys):
            raise _bad(path, "keyfp must list 40-digit hexadecimal fingerprints")
        seen.add(directory)
        groups.append(Group(str(raw.get("tagname", "")), mode, directory,
                            frozenset(k.upper() for k in keys)))
    return groups


def enforce(image: str, site: SiteConfig) -> None:
    """Raise :class:`Refused` unless the site's list (if any) lets SIF *image* run."""
    groups = load(site.values.get("ecl file") or DEFAULT_FILE)
    if groups is None:
        return
    real = os.path.realpath(image)
    group = next((g for g in groups if g.directory == os.path.dirname(real)), None) \
        or next((g for g in groups if not g.directory), None)
    if group is None:
        raise Refused(image, f"{os.path.dirname(real)} is in no execgroup")
    from capsid.signing import openpgp, sifsign

    keyring = site.values.get("global keyring") or (
        DEFAULT_KEYRING if os.path.exists(DEFAULT_KEYRING) else APPTAINER_KEYRING)
    try:
        data = Path(keyring).read_bytes()
    except OSError:
        data = b""
    result = sifsign.verify(Path(real), openpgp.parse(data, keyring))
    if result.problems:
        raise Refused(image, result.problems[0])
    tampered = [s for s in result.signatures if s.tampered]
    if tampered:
        raise Refused(image, f"signature {tampered[0].id}: {tampered[0].error}")
    groups_all = {s.group for s in result.signatures}
    by_key: dict[str, set[int]] = {}
    for s in result.signatures:
        if s.ok:
            by_key.setdefault(s.fingerprint, set()).add(s.group)
    signed_all = {k for k, gs in by_key.items() if gs == groups_all}
    signed_any = {s.fingerprint for s in result.signatures}
    if group.mode == "whitelist" and not group.keys & signed_all:
        raise Refused(image, f"execgroup {group.tag!r} needs a signature by one of its keys")
    if group.mode == "whitestrict" and not group.keys <= signed_all:
        raise Refused(image, f"execgroup {group.tag!r} needs signatures by all of its keys")
    if group.mode == "blacklist" and group.keys & signed_any:
        raise Refused(image, f"execgroup {group.tag!r} forbids a key that signed it")
