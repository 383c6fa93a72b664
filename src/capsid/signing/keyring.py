"""The user's OpenPGP keyrings, laid out as Apptainer's.

``pgp-public`` and ``pgp-secret`` hold binary OpenPGP keys one after another, in
capsid's keys directory (``$CAPSID_KEYSDIR``, else ``~/.config/capsid/keys``). While
capsid has no keyring of its own, Apptainer's (``$APPTAINER_KEYSDIR``, else
``~/.apptainer/keys``, else Singularity's ``~/.singularity/sypgp``) is read, so keys
made with Apptainer sign and verify at once; the first change capsid makes is written
to capsid's own. The secret keyring is private (mode 0600) and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from capsid.errors import CapsidError
from capsid.signing.openpgp import Key, parse

PUBLIC, SECRET = "pgp-public", "pgp-secret"


def own_directory() -> Path:
    env = os.environ.get("CAPSID_KEYSDIR")
    if env:
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".config")
    return Path(config) / "capsid" / "keys"


def _apptainer_directories() -> list[Path]:
    env = os.environ.get("APPTAINER_KEYSDIR")
    if env:
        return [Path(env)]
    home = Path(os.path.expanduser("~"))
    return [home / ".apptainer" / "keys", home / ".singularity" / "sypgp"]


def location(kind: str) -> Path:
    """The file the *kind* keyring is read from: capsid's, else Apptainer's where that
    exists, else capsid's (to be made)."""
    own = own_directory() / kind
    if own.exists():
        return own
    for directory in _apptainer_directories():
        if (directory / kind).is_file():
            return directory / kind
    return own


def load(kind: str) -> list[Key]:
    """The keys of the *kind* keyring, in order (an index is a position here)."""
    path = location(kind)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CapsidError(f"cannot read the keyring {path}: {err.strerror}",
                          "check its permissions") from None
    return parse(data, f"the keyring {path}")


def save(kind: str, keys: list[Key]) -> Path:
    """Write *keys* as capsid's *kind* keyring (atomically, only the user may read it)."""
    from capsid.image import output

    directory = own_directory()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / kind
        data = b"".join(k.secret_bytes() if kind == SECRET else k.public_bytes() for k in keys)
        with output.atomic_file(path, force=True, mode=0o600) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        raise CapsidError(f"cannot write the keyring in {directory}: {err.strerror}",
                          f"check that {directory} is yours and writable") from None
    return path


def merged(existing: list[Key], new: list[Key]) -> tuple[list[Key], list[Key]]:
    """*existing* with *new* keys added; a key already there is merged with the new
    copy (which may carry a revocation or a new expiry, never lose one). Also returns
    the keys that were added or changed."""
    out = list(existing)
    changed = []
    for key in new:
        index = next((i for i, old in enumerate(out) if old.fingerprint == key.fingerprint),
                     None)
        if index is None:
            out.append(key)
            changed.append(key)
            continue
        old = out[index]
        combined = Key(old.cert.merge(key.cert), key.secret or old.secret)
        if combined.public_bytes() != old.public_bytes() or (key.secret and not old.secret):
            out[index] = combined
            changed.append(combined)
    return out, changed
