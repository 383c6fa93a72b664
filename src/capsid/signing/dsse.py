"""Signatures with PEM keys: the integrity metadata in a DSSE envelope, as Apptainer 1.2
and later make them with ``sign --key``.

DSSE (Dead Simple Signing Envelope, the secure-systems-lab specification sigstore uses)
signs the pre-authentication encoding ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP
body`` and stores ``{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig"
(base64)}]}``. The payload type is the SIF library's
``application/vnd.sylabs.sif-metadata+json``; keys are RSA (PKCS #1 v1.5), ECDSA (DER) or
Ed25519, with SHA-256, as sigstore's signers load them from PEM. The cryptography is the
``cryptography`` package's.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from capsid.errors import CapsidError
from capsid.signing.openpgp import NotVerified

MEDIA_TYPE = "application/vnd.sylabs.sif-metadata+json"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding of *body*."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def _read(path: str, what: str) -> bytes:
    from capsid.image.locate import read_limited

    return read_limited(path, f"the {what}", "give the path of a PEM key file")


def load_private(path: str) -> Any:
    """The private key in PEM file *path* (``CAPSID_SIGN_PASSPHRASE`` opens an encrypted
    one)."""
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "private key")
    password = os.environ.get("CAPSID_SIGN_PASSPHRASE")
    try:
        return serialization.load_pem_private_key(
            data, password.encode() if password is not None else None)
    except TypeError:
        raise CapsidError(f"{path} is encrypted", "set CAPSID_SIGN_PASSPHRASE to its "
                          "passphrase") from None
    except (ValueError, binascii.Error) as err:
        raise CapsidError(f"{path} is not a private key capsid can use ({err})",
                          "give an RSA, ECDSA or Ed25519 private key in PEM") from None


def load_public(path: str) -> Any:
    """The public key in PEM file *path* (a private key's public half is taken too)."""
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "public key")
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, binascii.Error):
        pass
    try:
        return load_private(path).public_key()
    except CapsidError:
        raise CapsidError(f"{path} is not a public key capsid can use",
                          "give an RSA, ECDSA or Ed25519 public key in PEM") from None


def _signature(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise CapsidError(f"{type(key).__name__} keys cannot sign images",
                      "use an RSA, ECDSA or Ed25519 key")


def _check(key: Any, sig: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def sign(key: Any, body: bytes) -> bytes:
    """*body* in a DSSE envelope signed with private *key*."""
    sig = _signature(key, pae(MEDIA_TYPE, body))
    envelope = {"payloadType": MEDIA_TYPE, "payload": base64.b64encode(body).decode(),
                "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}]}
    return json.dumps(envelope, separators=(",", ":")).encode()


def is_envelope(data: bytes) -> bool:
    return data.lstrip().startswith(b"{")


def verify(data: bytes, keys: list[Any]) -> bytes:
    """The payload of envelope *data* if one of its signatures verifies with one of the
    public *keys*; else :class:`NotVerified`."""
    try:
        envelope = json.loads(data)
        kind, payload = envelope["payloadType"], envelope["payload"]
        sigs = [base64.b64decode(s["sig"]) for s in envelope["signatures"]]
        body = base64.b64decode(payload)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise NotVerified("it is not a DSSE envelope") from None
    if kind != MEDIA_TYPE:
        raise NotVerified(f"its payload type is {str(kind)[:60]!r}, not SIF metadata")
    if not keys:
        raise NotVerified("it was made with a PEM key: verify with --key PUBLIC.pem")
    message = pae(kind, body)
    if not any(_check(key, sig, message) for key in keys for sig in sigs):
        raise NotVerified("no signature in it verifies with the given key")
    return body
