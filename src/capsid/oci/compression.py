"""Layer decompression by content: gzip, zstd or plain tar, as a stream of chunks.

The media type is a hint that registries and archives get wrong often enough
(``docker save`` names plain tars ``…tar.gzip`` in some versions), so the
first bytes decide. Optionally every raw byte read is fed to a hash, so a
layer's digest is checked in the same pass that decompresses it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

from capsid.errors import ImageFormatError

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _raw(f: BinaryIO, hasher: Hasher | None, first: bytes) -> Iterator[bytes]:
    chunk = first
    while chunk:
        if hasher is not None:
            hasher.update(chunk)
        yield chunk
        chunk = f.read(CHUNK)


def _inflater() -> Any:
    """A gzip decompressor: Intel ISA-L's (about 2.5 times zlib's speed) when installed."""
    try:
        from isal import isal_zlib

        return isal_zlib.decompressobj(31)
    except ImportError:
        return zlib.decompressobj(wbits=31)


def _gunzip(raw: Iterator[bytes]) -> Iterator[bytes]:
    inflater = _inflater()
    for chunk in raw:
        while chunk:
            try:
                out = inflater.decompress(chunk)
            except Exception as e:  # zlib.error or isal's IsalError: the data is bad
                raise ImageFormatError(f"a gzip layer is corrupt ({e})",
                                       "pull or save the image again") from None
            if out:
                yield out
            if inflater.eof:  # concatenated gzip members
                chunk = inflater.unused_data
                inflater = _inflater()
            else:
                chunk = b""
    tail = inflater.flush()
    if tail:
        yield tail


def _unzstd(raw: Iterator[bytes]) -> Iterator[bytes]:
    import zstandard

    decompressor = zstandard.ZstdDecompressor().decompressobj()
    for chunk in raw:
        try:
            out = decompressor.decompress(chunk)
        except zstandard.ZstdError as e:
            raise ImageFormatError(f"a zstd layer is corrupt ({e})",
                                   "pull or save the image again") from None
        if out:
            yield out


def decompressed(f: BinaryIO, hasher: Hasher | None = None) -> Iterator[bytes]:
    """The uncompressed bytes of the layer in *f*, whatever its compression."""
    first = f.read(CHUNK)
    raw = _raw(f, hasher, first)
    if first.startswith(GZIP_MAGIC):
        return _gunzip(raw)
    if first.startswith(ZSTD_MAGIC):
        return _unzstd(raw)
    return raw


def ahead(chunks: Iterator[bytes], depth: int = 4) -> Iterator[bytes]:
    """Run *chunks* in a thread, up to *depth* chunks ahead of the consumer.

    Decompression and hashing release the GIL, so this overlaps them with the
    consumer's work. Errors are raised in the consumer; if the consumer stops
    early, the thread stops too.
    """
    import queue
    import threading

    q: queue.Queue[tuple[int, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put((0, chunk), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((1, None))
        except BaseException as e:  # handed to the consumer
            q.put((2, e))

    thread = threading.Thread(target=produce, name="capsid-decompress", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 0:
                yield item
            elif kind == 1:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()
