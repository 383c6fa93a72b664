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
    """Inflate, at most :data:`CHUNK` bytes out at a time whatever the ratio (bombs)."""
    inflater = _inflater()
    for chunk in raw:
        while chunk:
            try:
                out = inflater.decompress(chunk, CHUNK)
            except Exception as e:  # zlib.error or isal's IsalError: the data is bad
                raise ImageFormatError(f"a gzip layer is corrupt ({e})",
                                       "pull or save the image again") from None
            if out:
                yield out
            if inflater.eof:  # concatenated gzip members
                chunk = inflater.unused_data
                inflater = _inflater()
            else:
                chunk = inflater.unconsumed_tail
    tail = inflater.flush()
    if tail:
        yield tail


class _ChunkReader:
    """A file-like ``read`` over an iterator of chunks, for zstandard's stream reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def read(self, size: int = -1) -> bytes:
        if not self._rest:
            self._rest = next(self._chunks, b"")
        if size < 0 or size >= len(self._rest):
            data, self._rest = self._rest, b""
        else:
            data, self._rest = self._rest[:size], self._rest[size:]
        return data


#: Largest zstd window accepted: zstd's own default limit (128 MiB); larger needs --long.
ZSTD_MAX_WINDOW = 1 << 27


def _unzstd(raw: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress zstd frames, at most :data:`CHUNK` bytes out at a time (bombs)."""
    import zstandard

    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
        _ChunkReader(raw), read_size=CHUNK, read_across_frames=True)  # type: ignore[arg-type]
    while True:
        try:
            out = reader.read(CHUNK)
        except zstandard.ZstdError as e:
            raise ImageFormatError(f"a zstd layer is corrupt or needs more than "
                                   f"{ZSTD_MAX_WINDOW >> 20} MiB to decompress ({e})",
                                   "pull or save the image again") from None
        if not out:
            return
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

    def put(item: tuple[int, Any]) -> bool:
        """Queue *item* unless the consumer has gone; never block past its leaving."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put((0, chunk)):
                    return
            put((1, None))
        except BaseException as e:  # handed to the consumer
            put((2, e))

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
