"""The registry client's retry and auth logic, and platform and compression handling,
against in-process fakes (the real servers are in tests/integration/test_oci.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import httpx
import pytest
import zstandard

from capsid.errors import CapsidError
from capsid.oci import compression
from capsid.oci.image import check_platform, choose_platform, host_platform, parse_platform
from capsid.oci.reference import parse
from capsid.oci.registries import Endpoint
from capsid.oci.registry import Client, RegistryError
from capsid.oci.store import Store

MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAPSID_RETRY_DELAY", "0.001")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("CAPSID_DOCKER_USERNAME", "CAPSID_DOCKER_PASSWORD", "REGISTRY_AUTH_FILE"):
        monkeypatch.delenv(name, raising=False)


def endpoint() -> Endpoint:
    return Endpoint(parse("registry.test/team/app:1"))


def test_429_and_503_are_retried_and_bearer_tokens_fetched() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/token":
            assert request.url.params["scope"] == "repository:team/app:pull"
            return httpx.Response(200, json={"token": "t0k"})
        if request.headers.get("authorization") != "Bearer t0k":
            return httpx.Response(401, headers={"www-authenticate":
                                                'Bearer realm="https://auth.test/token",'
                                                'service="registry.test"'})
        if seen.count("GET /v2/team/app/manifests/1") < 4:
            return httpx.Response(429 if len(seen) % 2 else 503, headers={"retry-after": "0"})
        media = "application/vnd.oci.image.manifest.v1+json"
        return httpx.Response(200, content=MANIFEST, headers={"content-type": media})

    with Client(transport=httpx.MockTransport(handler)) as client:
        raw, media, digest = client.manifest(endpoint(), "1")
    assert raw == MANIFEST and digest == DIGEST and media.endswith("manifest.v1+json")
    assert seen.count("GET /token") == 1


def test_persistent_failure_is_one_clear_error() -> None:
    with Client(transport=httpx.MockTransport(lambda r: httpx.Response(503))) as client, \
            pytest.raises(RegistryError, match="HTTP 503"):
        client.manifest(endpoint(), "1")


def test_a_blob_that_does_not_match_its_digest_never_enters_the_cache(tmp_path: Path) -> None:
    good = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(good).hexdigest()

    class Body(httpx.SyncByteStream):  # streamed like a real socket, not pre-read
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield b"evil "
            yield b"bytes"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body())

    store = Store(tmp_path / "cache").prepare()
    with Client(transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(RegistryError, match="could not download"):
        client.fetch_blob(endpoint(), digest, store)
    assert not store.has(digest)


def test_a_cached_sif_changed_through_another_name_is_not_trusted(tmp_path: Path) -> None:
    import os
    import time

    store = Store(tmp_path / "cache").prepare()
    sif = store.sif_path(DIGEST, "zstd")
    sif.write_bytes(b"made by a pull")
    sif.chmod(0o755)
    assert store.intact_sif(sif)  # no stamp, one name: as an older capsid left it
    store.record_sif(sif)
    assert store.intact_sif(sif)
    out = tmp_path / "out.sif"
    os.link(sif, out)
    assert store.intact_sif(sif)  # shared, unchanged
    time.sleep(0.01)
    with open(out, "ab") as f:  # an overlay or a signature added in place
        f.write(b" and changed")
    assert not store.intact_sif(sif)
    store.record_sif(sif)
    out.chmod(0o775)  # others may write it now
    assert not store.intact_sif(sif)
    out.unlink()  # one name again: private to the cache
    assert store.intact_sif(sif)
    os.link(sif, out)
    out.unlink()
    sif.unlink()
    sif.write_bytes(b"replaced")  # another file under the name
    assert not store.intact_sif(sif)
    store.drop_sif(sif)
    assert not sif.exists() and not list(store.stamps.iterdir())
    assert not store.intact_sif(sif)


def test_cleaning_the_cache_removes_the_stamps(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache").prepare()
    sif = store.sif_path(DIGEST, "zstd")
    sif.write_bytes(b"made")
    store.record_sif(sif)
    assert [kind for kind, _p, _st in store.entries()] == ["sif"]
    store.clean()
    assert not sif.exists() and not list(store.stamps.iterdir())


def test_platforms_are_chosen_from_an_index_with_arm_variants() -> None:
    index = {"manifests": [
        {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "sha256:v7", "platform": {"os": "linux", "architecture": "arm",
                                             "variant": "v7"}},
        {"digest": "sha256:v8", "platform": {"os": "linux", "architecture": "arm64",
                                             "variant": "v8"}},
        {"digest": "sha256:win", "platform": {"os": "windows", "architecture": "amd64"}},
    ]}
    assert choose_platform(index, parse_platform("amd64"), "x")["digest"] == "sha256:amd"
    assert choose_platform(index, parse_platform("linux/arm64"), "x")["digest"] == "sha256:v8"
    assert choose_platform(index, parse_platform("arm/v7"), "x")["digest"] == "sha256:v7"
    with pytest.raises(CapsidError, match="has no image for linux/ppc64le"):
        choose_platform(index, parse_platform("ppc64le"), "x")


def test_an_image_of_one_architecture_is_checked_against_the_one_asked_for(capsys) -> None:  # type: ignore[no-untyped-def]
    """No index to choose from: an image for another machine than the one asked for is an
    error; one for another machine than this, when nothing was asked, a warning."""
    host = host_platform()
    other = "s390x" if host[0] != "s390x" else "amd64"
    check_platform({"architecture": host[0]}, host, "x")
    check_platform({}, parse_platform(other), "x")  # nothing said: taken as it is
    with pytest.raises(CapsidError, match=f"x is an image for linux/{host[0]} only, not for "
                                          f"linux/{other}"):
        check_platform({"architecture": host[0]}, parse_platform(other), "x")
    assert capsys.readouterr().err == ""
    check_platform({"architecture": other}, host, "x")
    assert "runs only under emulation" in capsys.readouterr().err


@pytest.mark.parametrize("pack", [
    lambda b: b,
    lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:]),  # two gzip members
    lambda b: zstandard.ZstdCompressor().compress(b),
])
def test_layers_decompress_by_content_and_hash_the_raw_bytes(pack) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 4000
    raw = pack(data)
    hasher = hashlib.sha256()
    out = b"".join(compression.ahead(compression.decompressed(io.BytesIO(raw), hasher)))
    assert out == data
    assert hasher.hexdigest() == hashlib.sha256(raw).hexdigest()


def test_read_ahead_thread_never_outlives_its_consumer() -> None:
    """#10.12: an error in the producer while the queue was full made close() wait forever."""
    import threading
    import time

    from capsid.oci.compression import ahead

    def chunks():  # type: ignore[no-untyped-def]
        yield b"one"
        yield b"two"  # fills the queue of depth 1
        raise ValueError("the layer broke")

    stream = ahead(chunks(), depth=1)
    assert next(stream) == b"one"
    time.sleep(0.3)  # the producer is now blocked on the full queue with its error
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=5)
    assert not closer.is_alive(), "closing the stream hung"
