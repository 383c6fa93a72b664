"""What a SIF signature covers, in the format of the reference SIF library's ``integrity``
package (what Apptainer calls), so that each side verifies the other's signatures.

A signature covers one object group. Its signed message is JSON::

    {"version":1,"header":{"digest":"sha256:…"},
     "objects":[{"relativeId":0,"descriptorDigest":"sha256:…","objectDigest":"sha256:…"}]}

The header digest is over the launch script, magic, version and image ID (not the times
or the table, which change as objects are added). An object's descriptor digest is over
its type, used flag, ID relative to the group's lowest, link, size, creation time, uid,
gid, name and extra bytes, packed little-endian as in the file (not its offset, which
adding objects may not change anyway); its object digest is over its data. The signature
object itself belongs to no group, links to the group, and carries the hash type and the
signing key's fingerprint in its descriptor.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from capsid.errors import ImageFormatError
from capsid.image.siftable import HEADER, read_table

GROUP_MASK = 0xF0000000
SIGNATURE = 0x4005
#: SIF hash type codes and the digest names the metadata uses
HASH_NAMES = {1: "sha256", 2: "sha384", 3: "sha512"}
HASH_CODES = {name: code for code, name in HASH_NAMES.items()}
_INTEGRITY = struct.Struct("<iBIIqqqq")


class IntegrityError(Exception):
    """A signed thing does not match the image: the message names what."""


@dataclass(frozen=True)
class Object:
    """One used descriptor, raw."""

    data_type: int
    used: int
    id: int
    raw_group: int
    raw_link: int
    offset: int
    size: int
    created_at: int
    uid: int
    gid: int
    name: bytes
    extra: bytes

    @property
    def group(self) -> int:
        return self.raw_group & ~GROUP_MASK

    @property
    def linked_group(self) -> int | None:
        """The group a signature covers (its link names a group), else None."""
        if self.raw_link & GROUP_MASK == GROUP_MASK:
            return self.raw_link & ~GROUP_MASK
        return None

    def signature(self) -> tuple[str | None, str]:
        """A signature object's (hash name, or None if unknown; key fingerprint as hex,
        "" where it names none: a PEM key's)."""
        code, entity = struct.unpack_from("<i20s", self.extra)
        return HASH_NAMES.get(code), entity.hex().upper() if entity.strip(b"\0") else ""


class Image:
    """A SIF file's header and objects as the integrity format reads them."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        with open(os.dup(fd), "rb") as f:
            _raw, used = read_table(f, path)
        head = os.pread(fd, HEADER.size, 0)
        self.header_bytes = head[0:45] + head[48:64]  # launch script, magic, version, ID
        self.objects = [Object(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[8], d[10], d[11],
                               d[12], d[13]) for d in used]

    def groups(self) -> list[int]:
        return sorted({o.group for o in self.objects if o.group})

    def group(self, group: int) -> list[Object]:
        return sorted((o for o in self.objects if o.group == group), key=lambda o: o.id)

    def signatures(self, group: int) -> list[Object]:
        return [o for o in self.objects if o.data_type == SIGNATURE
                and o.linked_group == group]

    def data(self, obj: Object) -> bytes:
        got = os.pread(self.fd, obj.size, obj.offset)
        if len(got) != obj.size:
            raise ImageFormatError(f"{self.path}: object {obj.id} ends early",
                                   "the file is truncated; download or build it again")
        return got

    def chunks(self, obj: Object) -> Iterator[bytes]:
        pos, left = obj.offset, obj.size
        while left:
            chunk = os.pread(self.fd, min(left, 1 << 20), pos)
            if not chunk:
                raise ImageFormatError(f"{self.path}: object {obj.id} ends early",
                                       "the file is truncated; download or build it again")
            pos, left = pos + len(chunk), left - len(chunk)
            yield chunk


def _digest(name: str, chunks: Iterator[bytes] | bytes) -> str:
    h = hashlib.new(name)
    if isinstance(chunks, bytes):
        h.update(chunks)
    else:
        for chunk in chunks:
            h.update(chunk)
    return f"{name}:{h.hexdigest()}"


def _descriptor_bytes(obj: Object, relative: int) -> bytes:
    return _INTEGRITY.pack(obj.data_type, obj.used, relative, obj.raw_link, obj.size,
                           obj.created_at, obj.uid, obj.gid) + obj.name + obj.extra


def metadata(image: Image, objects: list[Object], hash_name: str = "sha256") -> bytes:
    """The message a signature of *objects* (one group's, sorted by ID) signs."""
    low = min(o.id for o in image.group(objects[0].group))
    entries = [{"relativeId": o.id - low,
                "descriptorDigest": _digest(hash_name, _descriptor_bytes(o, o.id - low)),
                "objectDigest": _digest(hash_name, image.chunks(o))} for o in objects]
    doc = {"version": 1, "header": {"digest": _digest(hash_name, image.header_bytes)},
           "objects": entries}
    return json.dumps(doc, separators=(",", ":")).encode()


def _parse_digest(value: Any) -> tuple[str, str]:
    if not isinstance(value, str) or value.count(":") != 1:
        raise IntegrityError("the signed metadata has a malformed digest")
    name, hexa = value.split(":")
    if name not in HASH_CODES or len(hexa) != 2 * hashlib.new(name).digest_size:
        raise IntegrityError(f"the signed metadata uses an unsupported digest {name!r}")
    return name, hexa.lower()


def check(image: Image, group: int, message: bytes, subset: list[Object] | None = None
          ) -> list[Object]:
    """The objects of *group* that signed *message* vouches for, all checked against the
    image's current bytes. Raises :class:`IntegrityError` naming the first mismatch."""
    try:
        doc = json.loads(message)
        entries = doc["objects"]
        header_digest = doc["header"]["digest"]
        if doc.get("version") != 1 or not isinstance(entries, list):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("the signed metadata is not the SIF integrity format") from None
    objects = image.group(group)
    if not objects:
        raise IntegrityError(f"object group {group} is not in the image")
    low = objects[0].id
    by_id = {o.id: o for o in objects}
    signed: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("relativeId"), int):
            raise IntegrityError("the signed metadata is not the SIF integrity format")
        signed[low + entry["relativeId"]] = entry
    wanted = subset if subset is not None else objects
    if subset is None:
        for oid in signed:
            if oid not in by_id:
                raise IntegrityError(f"signed object {oid} is not in the image")
        for o in objects:
            if o.id not in signed:
                raise IntegrityError(f"object {o.id} is not signed")
    name, value = _parse_digest(header_digest)
    if _digest(name, image.header_bytes) != f"{name}:{value}":
        raise IntegrityError("the SIF global header changed (its ID or launch script)")
    for o in wanted:
        entry = signed.get(o.id)
        if entry is None:
            raise IntegrityError(f"object {o.id} is not signed")
        name, value = _parse_digest(entry.get("descriptorDigest"))
        if _digest(name, _descriptor_bytes(o, o.id - low)) != f"{name}:{value}":
            raise IntegrityError(f"the descriptor of object {o.id} changed")
        name, value = _parse_digest(entry.get("objectDigest"))
        if _digest(name, image.chunks(o)) != f"{name}:{value}":
            raise IntegrityError(f"the data of object {o.id} changed")
    return wanted


def signature_extra(hash_name: str, fingerprint: str) -> bytes:
    """A signature descriptor's extra bytes: the hash type and the key's fingerprint."""
    return struct.pack("<i", HASH_CODES[hash_name]) + bytes.fromhex(fingerprint)  # "" for none

