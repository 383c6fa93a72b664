"""Real registries for tests and benchmarks: Debian's docker-registry on loopback.

- a throw-away CA and a server certificate for 127.0.0.1/localhost (openssl);
- htpasswd (bcrypt) auth, or the token flow: a small token service that checks
  basic credentials and signs JWTs (RS256, x5c) that the registry verifies;
- a TCP proxy that cuts connections part-way, to prove retry and resume.

Everything listens on 127.0.0.1 only and is stopped by :meth:`Registry.stop`.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

USER, PASSWORD = "capsid", "s3cret-pass"
SERVICE, ISSUER = "capsid-test-registry", "capsid-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """ca.crt, server.crt/key (127.0.0.1, localhost), token.crt/key under *d*."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=capsid test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,"
                               "keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=capsid token signer", "-keyout", "token.key", "-out", "token.crt", cwd=d)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues registry tokens to clients that present USER:PASSWORD (or none, read-only)."""

    def __init__(self, pki: Path, anonymous_pull: bool = False) -> None:
        self.pki = pki
        self.anonymous_pull = anonymous_pull
        self.port = free_port()
        self.requests = 0
        der = ssl.PEM_cert_to_DER_cert((pki / "token.crt").read_text())
        self._header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT",
                                           "x5c": [base64.b64encode(der).decode()]}).encode())
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                service.requests += 1
                from urllib.parse import parse_qs, urlparse

                query = parse_qs(urlparse(self.path).query)
                given = self.headers.get("Authorization", "")
                good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if given and given != good:
                    self.send_response(401)
                    self.end_headers()
                    return
                if not given and not service.anonymous_pull:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = scope.split(":")
                    allowed = actions.split(",") if given else ["pull"]
                    access.append({"type": kind, "name": name,
                                   "actions": [a for a in actions.split(",") if a in allowed]})
                token = service.sign({"iss": ISSUER, "sub": USER if given else "",
                                      "aud": query.get("service", [SERVICE])[0],
                                      "exp": int(time.time()) + 600,
                                      "nbf": int(time.time()) - 60, "iat": int(time.time()),
                                      "jti": secrets.token_hex(8), "access": access})
                body = json.dumps({"token": token, "expires_in": 600}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict[str, object]) -> str:
        signing_input = f"{self._header}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.pki / "token.key")],
            input=signing_input.encode(), capture_output=True, check=True).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Registry:
    """One docker-registry process on 127.0.0.1 with TLS and the chosen auth."""

    def __init__(self, root: Path, pki: Path, auth: str = "htpasswd",
                 tls: bool = True, anonymous_pull: bool = False) -> None:
        """Start it; its log (level info: one line per request) is ``root/registry.log``."""
        self.root = root
        self.pki = pki
        self.tls = tls
        self.port = free_port()
        self.token: TokenService | None = None
        root.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": secrets.token_hex(8)},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(pki / "server.crt"),  # type: ignore[index]
                                     "key": str(pki / "server.key")}
        if auth == "htpasswd":
            hashed = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                    capture_output=True, text=True).stdout
            (root / "htpasswd").write_text(hashed)
            config["auth"] = {"htpasswd": {"realm": "capsid-test", "path": str(root / "htpasswd")}}
        elif auth == "token":
            self.token = TokenService(pki, anonymous_pull)
            config["auth"] = {"token": {"realm": self.token.realm, "service": SERVICE,
                                        "issuer": ISSUER,
                                        "rootcertbundle": str(pki / "token.crt")}}
        (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        self._log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        exe = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        self._proc = subprocess.Popen([exe, "serve", str(root / "config.yml")],
                                      stdout=self._log, stderr=subprocess.STDOUT)
        self._wait()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError("docker-registry exited: "
                                   + (self.root / "registry.log").read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def skopeo_copy(self, src: str, dest_repo: str) -> None:
        """Push *src* (e.g. ``oci-archive:/x.tar``) with skopeo, as a real client would."""
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", src,
                f"docker://{self.host}/{dest_repo}"]
        argv += ["--dest-tls-verify=false"] if not self.tls else \
            ["--dest-cert-dir", str(self.cert_dir())]
        argv += ["--dest-creds", f"{USER}:{PASSWORD}"]
        env = {**os.environ, "TMPDIR": str(self.root)}
        subprocess.run(argv, check=True, capture_output=True, env=env)

    def blob_gets(self, digest: str) -> int:
        """How many successful GETs of blob *digest* the registry has served."""
        text = (self.root / "registry.log").read_text(errors="replace")
        return sum(1 for line in text.splitlines()
                   if "http.request.method=GET" in line and f"/blobs/{digest}" in line
                   and "http.response.status=200" in line)

    def manifest(self, target: str) -> dict[str, object]:
        """The manifest at ``docker://`` *target*, as skopeo reads it (with the test's
        credentials and CA)."""
        import json

        raw = subprocess.run(["skopeo", "inspect", "--raw", "--cert-dir", str(self.cert_dir()),
                              "--creds", f"{USER}:{PASSWORD}", target], capture_output=True,
                             text=True, check=True).stdout
        doc = json.loads(raw)
        assert isinstance(doc, dict)
        return doc

    def cert_dir(self) -> Path:
        d = self.root / "certs.d"
        d.mkdir(exist_ok=True)
        shutil.copy(self.pki / "ca.crt", d / "ca.crt")
        return d

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        if self.token:
            self.token.stop()


class CuttingProxy:
    """Forwards 127.0.0.1:port → target, cutting the first *cuts* big transfers.

    Each of the first *cuts* connections that has sent more than *after* bytes
    towards the client is closed abruptly at that point: a registry dying
    mid-blob. Works through TLS, which it does not look into.
    """

    def __init__(self, target_port: int, after: int, cuts: int) -> None:
        self.target_port = target_port
        self.after = after
        self.cuts_left = cuts
        self.cuts_done = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if down:
                    with self._lock:
                        cut = self.cuts_left > 0 and sent + len(data) > self.after
                        if cut:
                            self.cuts_left -= 1
                            self.cuts_done += 1
                            data = data[:max(0, self.after - sent)]
                        self.bytes_down += len(data)
                    if cut:
                        dst.sendall(data)
                        raise ConnectionAbortedError
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def stop(self) -> None:
        self._stop = True
        self._listener.close()
