"""Signing a SIF and verifying its signatures, as ``apptainer sign`` and ``verify`` do.

A signature is added per object group (or for chosen objects of one group): the group's
integrity metadata (:mod:`capsid.signing.integrity`) clear-signed with an OpenPGP key, in
a new object linked to the group, with the key's fingerprint in its descriptor. Adding
it rewrites the image to a copy that replaces it (see :func:`capsid.image.sif.add_object`),
so an interrupted signing leaves the image as it was; signing again adds a signature.
Verifying checks every signature of every group against the image's current bytes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsid.errors import CapsidError, UsageError
from capsid.signing import integrity
from capsid.signing.openpgp import Key, NotVerified, clearsign, verify_clear

HASH = "sha256"


def _open(path: Path) -> tuple[int, integrity.Image]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot open {path}: {err.strerror}",
                         "give the path of a SIF image") from None
    try:
        return fd, integrity.Image(fd, str(path))
    except BaseException:
        os.close(fd)
        raise


def _selection(image: integrity.Image, group: int | None, object_id: int | None
               ) -> list[tuple[int, list[integrity.Object]]]:
    """(group, objects to sign) pairs: one group's, one object's, or every group's."""
    if object_id is not None:
        found = [o for o in image.objects if o.id == object_id]
        if not found:
            raise UsageError(f"{image.path} has no object {object_id}",
                             "list its objects with 'capsid sif list'")
        if not found[0].group:
            raise UsageError(f"object {object_id} belongs to no group and cannot be signed",
                             "sign a group (--group-id) or the whole image")
        return [(found[0].group, found)]
    groups = [group] if group is not None else image.groups()
    if not groups:
        raise UsageError(f"{image.path} has no object group to sign",
                         "is it a SIF image capsid or Apptainer built?")
    out = []
    for g in groups:
        members = image.group(g)
        if not members:
            raise UsageError(f"{image.path} has no object group {g}",
                             "list its objects with 'capsid sif list'")
        out.append((g, members))
    return out


def sign(path: Path, key: Key | None, *, group: int | None = None,
         object_id: int | None = None, password: str | None = None,
         pem: Any = None) -> list[int]:
    """Add a signature to SIF *path* for each selected group, by OpenPGP *key* or, with
    *pem*, by that private key in a DSSE envelope; the new objects' IDs."""
    from capsid.image import sif
    from capsid.signing import dsse

    fd, image = _open(path)
    try:
        messages = []
        for g, objects in _selection(image, group, object_id):
            body = integrity.metadata(image, objects, HASH)
            if pem is not None:
                messages.append((g, dsse.sign(pem, body)))
            else:
                assert key is not None
                messages.append((g, clearsign(key, body, password)))
    finally:
        os.close(fd)
    fingerprint = key.fingerprint if pem is None and key is not None else ""
    from capsid.image.write import source_date_epoch

    epoch = source_date_epoch()  # a reproducible build's times stay its own
    now = epoch if epoch is not None else int(time.time())
    added = []
    for g, signed in messages:
        obj = sif.NewObject(sif.DataType.SIGNATURE, signed, group=0,
                            link=integrity.GROUP_MASK | g,
                            extra=integrity.signature_extra(HASH, fingerprint))
        added.append(sif.add_object(path, obj, when=now))
    return added


@dataclass
class Checked:
    """One signature, checked."""

    id: int
    group: int
    fingerprint: str  #: as the signature's descriptor names it
    signer: list[str] = field(default_factory=list)  #: the key's user IDs, once verified
    objects: list[int] = field(default_factory=list)  #: the objects it vouches for
    error: str | None = None
    tampered: bool = False  #: it verified, but what it signed changed since

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Verification:
    """Every signature of an image, checked; and what is wrong with the image as a whole."""

    path: Path
    signatures: list[Checked] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.signatures) \
            and all(s.ok for s in self.signatures)


def verify(path: Path, keys: list[Key], *, group: int | None = None,
           object_id: int | None = None, pem: list[Any] | None = None) -> Verification:
    """Check *path*'s signatures against OpenPGP *keys* and public *pem* keys (DSSE
    signatures); a failure is reported, not raised."""
    fd, image = _open(path)
    result = Verification(path)
    try:
        stray = [o.id for o in image.objects if not o.group
                 and o.data_type != integrity.SIGNATURE]
        if stray:
            result.problems.append(f"object {stray[0]} belongs to no group and is not a "
                                   "signature: nothing signed can vouch for it")
        for g, objects in _selection(image, group, object_id):
            sigs = image.signatures(g)
            if not sigs:
                result.problems.append(f"object group {g} is not signed")
            for sig in sigs:
                result.signatures.append(_check(image, sig, g, keys, pem or [],
                                                objects if object_id is not None else None))
    finally:
        os.close(fd)
    return result


def _check(image: integrity.Image, sig: integrity.Object, group: int, keys: list[Key],
           pem: list[Any], subset: list[integrity.Object] | None) -> Checked:
    from capsid.signing import dsse

    hash_name, fingerprint = sig.signature()
    checked = Checked(sig.id, group, fingerprint)
    try:
        if hash_name is None:
            raise NotVerified("its hash type is unknown")
        data = image.data(sig)
        if dsse.is_envelope(data):
            message = dsse.verify(data, pem)
            checked.signer = ["PEM key"]
        else:
            message, key = _openpgp(data, fingerprint, keys)
            checked.signer = key.user_ids
        checked.objects = [o.id for o in integrity.check(image, group, message, subset)]
    except integrity.IntegrityError as err:
        checked.error, checked.tampered = str(err), True
    except (NotVerified, CapsidError) as err:
        checked.error = str(err)
    return checked


def _openpgp(data: bytes, fingerprint: str, keys: list[Key]) -> tuple[bytes, Key]:
    known = next((k for k in keys if k.fingerprint == fingerprint), None)
    if known is None:
        raise NotVerified(f"the signing key {fingerprint} is not in your keyring "
                          "(import it with 'capsid key import FILE')")
    if known.revoked:
        raise NotVerified(f"the signing key {fingerprint} is revoked")
    if known.expired:
        raise NotVerified(f"the signing key {fingerprint} has expired")
    try:
        return verify_clear(data, [known])
    except NotVerified as err:
        raise NotVerified(f"the signature does not verify ({err})") from None
