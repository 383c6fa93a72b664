"""Layers converted while they download (oci/pull.py): what a reader of an arriving
layer sees, and a pull whose layer download starts over (an in-process registry)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from capsid.oci import pull, tosif
from capsid.oci.reference import parse
from capsid.oci.registry import Client, RegistryError
from capsid.oci.store import Store

DATA = bytes(range(256)) * 20000  # 5 MB


def _writer(path: Path, arrival: pull._Arrival, data: bytes, piece: int,
            pause: float = 0.0) -> threading.Thread:
    def run() -> None:
        with open(path, "wb") as f:
            arrival.start(path, 0)
            for at in range(0, len(data), piece):
                f.write(data[at:at + piece])
                f.flush()
                arrival.wrote(min(at + piece, len(data)))
                time.sleep(pause)
        arrival.finish(path)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _read_all(reader: object, size: int = 1 << 20) -> bytes:
    out = b""
    while chunk := reader.read(size):  # type: ignore[attr-defined]
        out += chunk
    return out


def test_a_layer_is_read_whole_while_it_arrives(tmp_path: Path) -> None:
    arrival = pull._Arrival()
    reader = arrival.opener()
    thread = _writer(tmp_path / "blob", arrival, DATA, 100_003, pause=0.001)
    try:
        assert _read_all(reader, 65536) == DATA
    finally:
        thread.join()
        reader.close()


def test_a_read_waits_for_all_it_asked_for(tmp_path: Path) -> None:
    """A short first read would hide the compression's magic bytes."""
    arrival = pull._Arrival()
    reader = arrival.opener()
    thread = _writer(tmp_path / "blob", arrival, b"\x28\xb5\x2f\xfd" + DATA[:10], 2,
                     pause=0.01)
    try:
        assert reader.read(4) == b"\x28\xb5\x2f\xfd"
    finally:
        thread.join()
        reader.close()


def test_a_resumed_download_goes_on_and_a_restarted_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(DATA[:1000])
    arrival = pull._Arrival()
    resumed, restarted = arrival.opener(), arrival.opener()
    arrival.start(path, 0)
    arrival.wrote(1000)
    assert resumed.read(600) == DATA[:600]
    assert restarted.read(1000) == DATA[:1000]
    arrival.start(path, 800)  # the connection dropped; resumed from byte 800
    with open(path, "r+b") as f:
        f.seek(800)
        f.write(DATA[800:])
    arrival.finish(path)
    assert resumed.read(-1) == DATA[600:]
    resumed.close()
    with pytest.raises(pull._Rewound):  # it had read bytes 800-999 of the first attempt
        restarted.read(10)
    restarted.close()


def test_a_failed_download_and_an_abandoned_conversion_end_the_wait(tmp_path: Path) -> None:
    failed, abandoned = pull._Arrival(), pull._Arrival()
    waiting: list[BaseException] = []

    def read(arrival: pull._Arrival) -> None:
        try:
            arrival.opener().read(10)
        except BaseException as err:
            waiting.append(err)

    threads = [threading.Thread(target=read, args=(a,)) for a in (failed, abandoned)]
    for thread in threads:
        thread.start()
    failed.fail(RegistryError("could not download blob", "try again"))
    abandoned.abandon()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(type(e).__name__ for e in waiting) == ["RegistryError", "_Rewound"]


# -- a whole pull, against a registry in this process ----------------------------------------------


def _layer() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, body in (("hello.txt", b"hello\n"), ("big.bin", DATA)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(body), 1
            tar.addfile(info, io.BytesIO(body))
    return gzip.compress(raw.getvalue(), mtime=0)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("first_attempt_corrupt", [False, True])
def test_a_pull_converts_as_it_downloads_and_survives_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_attempt_corrupt: bool) -> None:
    """The SIF is the same whether the layer arrived at once or had to be fetched again
    after its first bytes were converted (its digest did not match)."""
    monkeypatch.setenv("CAPSID_RETRY_DELAY", "0.001")
    monkeypatch.setenv("HOME", str(tmp_path))
    layer = _layer()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(layer), "size": len(layer)}]}).encode()
    gets: list[str] = []

    class Slowly(httpx.SyncByteStream):
        def __init__(self, body: bytes) -> None:
            self.body = body

        def __iter__(self):  # type: ignore[no-untyped-def]
            for at in range(0, len(self.body), 1 << 20):
                yield self.body[at:at + (1 << 20)]
                time.sleep(0.01)

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        gets.append(path)
        if path.endswith("/manifests/1"):
            return httpx.Response(200, content=manifest, headers={
                "content-type": "application/vnd.oci.image.manifest.v1+json"})
        if path.endswith(_digest(config)):
            return httpx.Response(200, content=config)
        if path.endswith(_digest(layer)):
            body = layer
            if first_attempt_corrupt and gets.count(path) == 1:
                body = layer[:-100] + bytes(100)  # same size, wrong bytes at the end
            return httpx.Response(200, stream=Slowly(body))
        return httpx.Response(404)

    def convert(cache: str) -> bytes:
        with pull.Puller(Store(tmp_path / cache)) as puller:
            puller.client = Client(transport=httpx.MockTransport(handler))
            return puller.cached_sif(parse("registry.test/team/app:1"),
                                     ("amd64", "")).read_bytes()

    streamed = convert("streamed")
    layer_gets = [g for g in gets if g.endswith(_digest(layer))]
    assert len(layer_gets) == (2 if first_attempt_corrupt else 1)
    reference_cache = Store(tmp_path / "reference").prepare()
    with pull.Puller(reference_cache) as puller:
        puller.client = Client(transport=httpx.MockTransport(handler))
        resolved = puller.resolve(parse("registry.test/team/app:1"), ("amd64", ""))
        out = tmp_path / "reference.sif"
        tosif.write_sif(puller.fetch(resolved), out, force=True, verified=True)
    assert streamed == out.read_bytes()
    partials = list((tmp_path / "streamed").rglob("partial/*"))
    assert partials == []
