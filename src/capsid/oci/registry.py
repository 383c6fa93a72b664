"""A client for the OCI distribution API (what Docker Hub, ghcr.io, quay.io, Harbor speak).

Built on httpx (a maintained HTTP/1.1 client with streaming and TLS through
Python's ``ssl``). It handles the auth dance (anonymous and credentialed bearer
tokens from the ``WWW-Authenticate`` challenge, or HTTP basic), retries with
back-off on 429, 5xx and dropped connections, and resumes interrupted blob
downloads with HTTP ``Range``. Every byte of a blob is hashed as it arrives and
the blob enters the cache only if it matches its digest.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from capsid import config, log
from capsid.errors import CapsidError, ImageFormatError, ImageNotFoundError
from capsid.oci import auth
from capsid.oci.image import ACCEPT, digest_of, sha256_digest
from capsid.oci.reference import DOCKER_HUB, DOCKER_HUB_API
from capsid.oci.registries import Endpoint

if TYPE_CHECKING:
    import httpx

    from capsid.oci.store import Store

LOG = log.get(__name__)

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
ATTEMPTS = 6
CHUNK = 1 << 20
_CHALLENGE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


class RegistryError(CapsidError):
    """A registry refused or failed a request."""


class UnreachableError(RegistryError):
    """The registry could not be reached at all (so a mirror or the cache may help)."""


def ssl_context() -> ssl.SSLContext:
    """The system's trust store; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` replace it as in OpenSSL."""
    return ssl.create_default_context()


def _delay(base: float, attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry *attempt*: exponential from *base*, jittered."""
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), 30.0)
    return float(min(base * (2 ** attempt), 20.0) * (0.5 + random.random() / 2))


class BlobWatch(Protocol):
    """What a reader of a blob being downloaded hears (:mod:`capsid.oci.pull` converts
    layers as they arrive)."""

    def start(self, partial: Path, valid: int) -> None:
        """Bytes go to *partial* from now; its first *valid* bytes stay as they are (a
        resumed download), any after them are written again."""

    def wrote(self, size: int) -> None:
        """*partial* holds *size* bytes, flushed (not yet checked against the digest)."""


class Client:
    """Talks to registries; one per command, shared by its download threads."""

    def __init__(self, progress: Callable[[int], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        import httpx

        self._http = httpx.Client(verify=ssl_context(), follow_redirects=True, trust_env=True,
                                  timeout=httpx.Timeout(60.0, connect=15.0),
                                  headers={"User-Agent": "capsid"}, transport=transport)
        self._tokens: dict[tuple[str, str], str] = {}
        self.progress = progress
        #: first retry's delay (CAPSID_RETRY_DELAY; tests make it short)
        self.retry_delay = config.env_seconds("RETRY_DELAY", 0.5)
        #: tries of one request on transient failures (fewer for a last-resort fallback)
        self.attempts = ATTEMPTS

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    @staticmethod
    def base_url(ep: Endpoint) -> str:
        host = DOCKER_HUB_API if ep.ref.registry == DOCKER_HUB else ep.ref.registry
        return f"{'http' if ep.insecure else 'https'}://{host}"

    def _send(self, method: str, url: str, *, headers: dict[str, str] | None = None,
              content: Callable[[], bytes | Iterable[bytes]] | None = None,
              stream: bool = False, host: str = "") -> httpx.Response:
        """One request with retries on transient failures. The caller closes streams."""
        import httpx

        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                request = self._http.build_request(
                    method, url, headers=headers,
                    content=content() if content is not None else None)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                last = e
                LOG.debug("%s %s: %s (attempt %d)", method, url, e, attempt + 1)
                time.sleep(_delay(self.retry_delay, attempt))
                continue
            if response.status_code in RETRY_STATUS and attempt + 1 < self.attempts:
                LOG.debug("%s %s: HTTP %d (attempt %d)", method, url, response.status_code,
                          attempt + 1)
                wait = _delay(self.retry_delay, attempt, response.headers.get("retry-after"))
                response.close()
                time.sleep(wait)
                continue
            return response
        raise _unreachable(host or url, last)

    def request(self, ep: Endpoint, method: str, path: str, *, actions: str = "pull",
                headers: dict[str, str] | None = None,
                content: Callable[[], bytes | Iterable[bytes]] | None = None,
                stream: bool = False, url: str | None = None) -> httpx.Response:
        """A request to *ep*'s repository, authenticating when challenged."""
        host = ep.ref.registry
        scope = f"repository:{ep.ref.repository}:{actions}"
        full = url or f"{self.base_url(ep)}/v2/{ep.ref.repository}/{path}"
        for round_ in range(2):
            sent = dict(headers or {})
            token = self._tokens.get((host, scope))
            if token:
                sent["Authorization"] = token
            response = self._send(method, full, headers=sent, content=content, stream=stream,
                                  host=host)
            if response.status_code != 401 or round_:
                return response
            challenge = response.headers.get("www-authenticate", "")
            response.close()
            self._tokens[(host, scope)] = self._authenticate(host, challenge, scope)
        raise AssertionError("not reached")

    def _authenticate(self, host: str, challenge: str, scope: str,
                      creds: tuple[str, str] | None = None) -> str:
        creds = creds or auth.credentials(host)
        kind = challenge.split(" ", 1)[0].lower()
        if kind == "basic":
            if creds is None:
                raise _denied(host, needs_login=True)
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if kind != "bearer":
            raise RegistryError(f"{host} asks for authentication capsid does not know "
                                f"({challenge.split(' ', 1)[0] or 'none given'})",
                                "use a registry that supports bearer or basic auth")
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"{host} sent a bearer challenge without a token address",
                                "the registry is misconfigured")
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        query.setdefault("scope", scope)
        headers = {}
        if creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{creds[0]}:{creds[1]}".encode()).decode()
        import httpx

        url = str(httpx.URL(realm, params=query))
        response = self._send("GET", url, headers=headers, host=host)
        if response.status_code in (401, 403):
            raise _denied(host, needs_login=creds is None)
        if response.status_code != 200:
            raise RegistryError(f"{host}'s token service answered HTTP {response.status_code}",
                                "try again later")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise RegistryError(f"{host}'s token service sent no token", "try again later")
        return f"Bearer {token}"

    def download(self, url: str, out: BinaryIO) -> None:
        """Write the plain file at http(s) *url* (no registry protocol) to *out*."""
        import httpx

        host = httpx.URL(url).host or url
        response = self._send("GET", url, stream=True, host=host)
        try:
            if response.status_code != 200:
                raise RegistryError(f"{url} answered HTTP {response.status_code}",
                                    "check the address")
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
                if self.progress is not None:
                    self.progress(len(chunk))
        except httpx.HTTPError as err:  # the connection broke off
            raise _unreachable(host, err) from None
        finally:
            response.close()

    def check_login(self, ep: Endpoint, username: str, password: str) -> None:
        """Raise RegistryError unless the registry accepts these credentials."""
        basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        response = self._send("GET", f"{self.base_url(ep)}/v2/",
                              headers={"Authorization": basic}, host=ep.ref.registry)
        response.close()
        challenge = response.headers.get("www-authenticate", "")
        if response.status_code == 401 and challenge.lower().startswith("bearer"):
            # the token service is the one that judges the credentials
            try:
                self._authenticate(ep.ref.registry, challenge, "", (username, password))
            except RegistryError as e:
                if "denied" not in e.message:
                    raise
                raise RegistryError(f"{ep.ref.registry} rejected the username or password",
                                    "check them and try again") from None
        elif response.status_code in (401, 403):
            raise RegistryError(f"{ep.ref.registry} rejected the username or password",
                                "check them and try again")

    # -- reading ---------------------------------------------------------------------------

    def manifest(self, ep: Endpoint, target: str) -> tuple[bytes, str, str]:
        """(raw manifest, media type, digest) of *target* (a tag or digest) at *ep*."""
        response = self.request(ep, "GET", f"manifests/{target}", headers={"Accept": ACCEPT})
        _check(response, ep, "manifest")
        raw = response.content
        digest = sha256_digest(raw)
        if target.startswith("sha256:") and digest != target:
            raise ImageFormatError(f"{ep.ref.registry} sent a manifest that does not match "
                                   f"{target[:19]}…", "the registry or a proxy is broken")
        media = response.headers.get("content-type", "").split(";", 1)[0].strip()
        return raw, media, digest

    def blob_bytes(self, ep: Endpoint, digest: str) -> bytes:
        """A small blob (a config), verified."""
        response = self.request(ep, "GET", f"blobs/{digest}")
        _check(response, ep, f"blob {digest[:19]}…")
        data = response.content
        if sha256_digest(data) != digest:
            raise ImageFormatError(f"blob {digest[:19]}… from {ep.ref.registry} does not match "
                                   "its digest", "try again; if it persists the registry is broken")
        return data

    def fetch_blob(self, ep: Endpoint, digest: str, store: Store,
                   watch: BlobWatch | None = None) -> Path:
        """Download blob *digest* into *store* (once, across processes); return its path.

        *watch* hears where the bytes are written as they arrive (see :class:`BlobWatch`).
        """
        if store.has(digest):
            return store.blob_path(digest)
        with store.lock(digest.split(":", 1)[1] + ".lock"):
            if store.has(digest):
                return store.blob_path(digest)
            partial = store.partial_path(digest)
            for attempt in range(ATTEMPTS):
                try:
                    if self._download(ep, digest, partial, watch):
                        return store.commit(partial, digest)
                except _Interrupted as e:
                    LOG.debug("blob %s interrupted at %d bytes: %s", digest[:19], e.at, e.cause)
                    time.sleep(_delay(self.retry_delay, attempt))
                    continue
                partial.unlink(missing_ok=True)  # wrong content: start afresh once
            raise RegistryError(f"could not download blob {digest[:19]}… from {ep.ref.registry}",
                                "check the network and try again; the part already "
                                "downloaded is kept")

    def _download(self, ep: Endpoint, digest: str, partial: Path,
                  watch: BlobWatch | None = None) -> bool:
        """Fetch (or resume) *partial*; True when it is complete and matches *digest*."""
        import httpx

        hasher = hashlib.sha256()
        offset = 0
        if partial.exists():
            with open(partial, "rb") as f:
                while block := f.read(CHUNK):
                    hasher.update(block)
                    offset += len(block)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.request(ep, "GET", f"blobs/{digest}", headers=headers, stream=True)
        try:
            if response.status_code == 416 and offset:
                return digest_of(hasher) == digest
            if response.status_code == 200 and offset:
                hasher, offset = hashlib.sha256(), 0  # the server ignored Range
            elif response.status_code not in (200, 206):
                response.read()
                _check(response, ep, f"blob {digest[:19]}…")
            mode = "ab" if offset else "wb"
            with open(partial, mode) as f:
                if watch is not None:
                    watch.start(partial, offset)
                try:
                    for chunk in response.iter_raw(CHUNK):
                        f.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                        if watch is not None:
                            f.flush()
                            watch.wrote(offset)
                        if self.progress:
                            self.progress(len(chunk))
                except httpx.TransportError as e:
                    raise _Interrupted(offset, e) from None
        finally:
            response.close()
        if digest_of(hasher) != digest:
            LOG.warning("blob %s from %s did not match its digest; downloading it again",
                        digest[:19], ep.ref.registry)
            return False
        return True

    # -- writing ---------------------------------------------------------------------------

    def has_blob(self, ep: Endpoint, digest: str) -> bool:
        response = self.request(ep, "HEAD", f"blobs/{digest}", actions="pull,push")
        response.close()
        return response.status_code == 200

    def upload_blob(self, ep: Endpoint, digest: str, size: int,
                    body: Callable[[], bytes | Iterable[bytes]]) -> None:
        """Upload one blob (monolithic POST + PUT), unless the registry has it already."""
        if self.has_blob(ep, digest):
            return
        response = self.request(ep, "POST", "blobs/uploads/", actions="pull,push",
                                headers={"Content-Length": "0"})
        _check(response, ep, "blob upload", (202,))
        location = response.headers.get("location", "")
        if not location:
            raise RegistryError(f"{ep.ref.registry} started an upload but gave no address",
                                "the registry is misconfigured")
        import httpx

        url = httpx.URL(self.base_url(ep)).join(location)
        url = url.copy_merge_params({"digest": digest})
        response = self.request(ep, "PUT", "", actions="pull,push", url=str(url), content=body,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(size)})
        _check(response, ep, f"blob {digest[:19]}… upload", (201, 204))

    def put_manifest(self, ep: Endpoint, raw: bytes, media_type: str) -> None:
        response = self.request(ep, "PUT", f"manifests/{ep.ref.target}", actions="pull,push",
                                content=lambda: raw, headers={"Content-Type": media_type})
        _check(response, ep, "manifest upload", (200, 201, 202))


class _Interrupted(Exception):
    def __init__(self, at: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.at = at
        self.cause = cause


def file_chunks(path: Path) -> Callable[[], Iterator[bytes]]:
    """A re-startable body for uploads: the file's bytes in chunks."""
    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                yield block
    return chunks


def _check(response: httpx.Response, ep: Endpoint, what: str,
           ok: tuple[int, ...] = (200,)) -> None:
    status = response.status_code
    if status in ok:
        return
    host, name = ep.ref.registry, f"{ep.ref.name}:{ep.ref.target}"
    if status in (401, 403):
        raise _denied(host, needs_login=auth.credentials(host) is None, name=ep.ref.name)
    if status == 404:
        raise ImageNotFoundError(f"{name} not found on {host} ({what})",
                                 "check the name and tag; private images need "
                                 f"'capsid registry login {host}'")
    raise RegistryError(f"{host} answered HTTP {status} for the {what} of {name}",
                        "try again later; run with --debug to see the requests")


def _denied(host: str, needs_login: bool, name: str = "") -> RegistryError:
    what = f" to {name}" if name else ""
    if needs_login:
        return RegistryError(f"{host} requires authentication{what}",
                             f"log in with 'capsid registry login {host}' or set "
                             "CAPSID_DOCKER_USERNAME and CAPSID_DOCKER_PASSWORD")
    return RegistryError(f"{host} denied access{what} with the stored credentials",
                         f"check the name, or log in again with 'capsid registry login {host}'")


def _unreachable(host: str, cause: Exception | None) -> UnreachableError:
    import httpx

    if isinstance(cause, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(cause):
        return UnreachableError(f"the TLS certificate of {host} is not trusted ({cause})",
                                "add its CA to the system store or SSL_CERT_FILE, or use "
                                "--nohttps for a plain-HTTP registry")
    if isinstance(cause, httpx.ConnectError) and "WRONG_VERSION_NUMBER" in str(cause):
        return UnreachableError(f"{host} does not speak TLS",
                                "use --nohttps (or 'insecure = true' in registries.conf)")
    return UnreachableError(f"cannot reach {host} ({cause or 'it keeps failing'})",
                            "check the network, the registry name and the port")
