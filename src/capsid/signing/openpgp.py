"""OpenPGP keys and clear-signed messages, through Sequoia-PGP (``pysequoia``).

Sequoia is a maintained, complete OpenPGP implementation; capsid writes no cryptography
of its own. Apptainer clear-signs the integrity metadata with the signing key of an
OpenPGP certificate and checks the signature against a keyring; this module does the
same. Keys are generated as OpenPGP v4 (RFC 4880) keys so that Apptainer and the SIF
library read them.
"""

from __future__ import annotations

import contextlib
import datetime
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from capsid.errors import CapsidError


class KeyProblem(CapsidError):
    """A key cannot be read or used."""


def _lib() -> Any:
    try:
        import pysequoia
    except ImportError:
        raise CapsidError("signing needs the pysequoia package",
                          "reinstall capsid with its dependencies (pip install capsid)"
                          ) from None
    return pysequoia


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


@dataclass(frozen=True)
class Key:
    """A certificate (public), with its secret key material where the keyring has it."""

    cert: Any  #: pysequoia Cert
    secret: Any = None  #: pysequoia Tsk, or None

    @property
    def fingerprint(self) -> str:
        return str(self.cert.fingerprint).upper()

    @property
    def user_ids(self) -> list[str]:
        return [str(u) for u in self.cert.user_ids]

    @property
    def revoked(self) -> bool:
        return bool(self.cert.is_revoked)

    @property
    def expiration(self) -> datetime.datetime | None:
        when = self.cert.expiration
        return when if isinstance(when, datetime.datetime) else None

    @property
    def expired(self) -> bool:
        when = self.expiration
        return when is not None and when <= datetime.datetime.now(datetime.UTC)

    def public_bytes(self) -> bytes:
        return bytes(self.cert)

    def secret_bytes(self) -> bytes:
        return bytes(self.secret)


def parse(data: bytes, what: str) -> list[Key]:
    """The keys in *data* (binary or ASCII-armored, public or secret, any number)."""
    lib = _lib()
    try:
        with _quiet():
            certs = lib.Cert.split_bytes(data) if data.strip() else []
    except Exception as err:  # pysequoia raises plain exceptions with Sequoia's message
        raise KeyProblem(f"{what} holds no OpenPGP key ({_first_line(err)})",
                        "export the key again, armored (gpg --armor --export)") from None
    with _quiet():
        return [Key(cert, cert.secrets if cert.has_secret_keys else None) for cert in certs]


def generate(user_id: str, bits: int) -> Key:
    """A new key pair: RSA of *bits*, as ``apptainer key newpair`` makes, or Ed25519
    for ``bits == 0``; a signing subkey; no expiry."""
    lib = _lib()
    suites = {0: lib.CipherSuite.Cv25519, 2048: lib.CipherSuite.RSA2k,
              3072: lib.CipherSuite.RSA3k, 4096: lib.CipherSuite.RSA4k}
    if bits not in suites:
        raise CapsidError(f"--bit-length {bits} is not supported",
                          "use 2048, 3072 or 4096")
    with _quiet():
        secret = lib.Tsk.generate(user_id, profile=lib.Profile.RFC4880,
                                  cipher_suite=suites[bits])
        return Key(secret.extract_certificate(), secret)


def armor(data: bytes, secret: bool) -> bytes:
    lib = _lib()
    kind = lib.ArmorKind.SecretKey if secret else lib.ArmorKind.PublicKey
    return str(lib.armor(data, kind)).encode()


def clearsign(key: Key, message: bytes, password: str | None = None) -> bytes:
    """*message* clear-signed with *key*'s signing key."""
    lib = _lib()
    if key.secret is None:
        raise KeyProblem(f"key {key.fingerprint} has no secret part here",
                        "import the secret key with 'capsid key import FILE'")
    try:
        with _quiet():
            signer = key.secret.signer(password)
    except Exception as err:
        raise KeyProblem(f"cannot use key {key.fingerprint} (a wrong passphrase?): "
                        f"{_first_line(err)}",
                        "give its passphrase, or choose another key with --keyidx") from None
    try:
        return bytes(lib.sign(signer, message, mode=lib.SignatureMode.CLEAR))
    except Exception as err:
        raise KeyProblem(f"cannot sign with key {key.fingerprint}: {_first_line(err)}",
                        "check that the key can sign and has not expired") from None


class NotVerified(Exception):
    """A signature that does not verify; the message says why."""


def verify_clear(signed: bytes, keys: list[Key]) -> tuple[bytes, Key]:
    """The message a clear-signed *signed* vouches for, and the key that signed it.

    Sequoia's policy applies: a revoked or expired key, a weak hash, a changed message
    or a key not in *keys* fail with :class:`NotVerified`."""
    lib = _lib()
    if not signed.lstrip().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
        raise NotVerified("it is not a clear-signed OpenPGP message")
    try:
        with _quiet():
            result = lib.verify(bytes=signed, store=lambda _ids: [k.cert for k in keys])
    except Exception as err:  # pysequoia raises plain exceptions with Sequoia's message
        raise NotVerified(_first_line(err)) from None
    valid = result.valid_sigs
    if not valid:
        raise NotVerified("no valid signature")
    primary = str(valid[0].certificate).upper()
    key = next((k for k in keys if k.fingerprint == primary), None)
    if key is None:
        raise NotVerified(f"signed by {primary}, which is not in the keyring")
    return bytes(result.bytes), key


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pysequoia warns of its own API's changes: not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
