"""OCI images to SIF: archives and layouts by buildah/umoci, a real TLS registry with auth,
mirrors, the cache under concurrency and kill -9, a failing network, and pushing back."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsid.image.sif import DataType, SifImage
from tests.conftest import CAPSID, need, run_capsid
from tests.support.registry import PASSWORD, USER, CuttingProxy, Registry

CREDS = {"CAPSID_DOCKER_USERNAME": USER, "CAPSID_DOCKER_PASSWORD": PASSWORD}


def ok(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
       **kw: object) -> subprocess.CompletedProcess[str]:
    return run_capsid(*args, check=True, env=env, **kw)


def fails(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    """Run capsid expecting its own failure; return the one-line error."""
    proc = run_capsid(*args, env=env)
    assert proc.returncode == 255, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsid: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def oci_config(image: Path) -> dict[str, object]:
    with SifImage(image) as s:
        found = s.find(DataType.GENERIC_JSON, "oci-config.json")
        assert found is not None
        return dict(json.loads(s.read(found)))


# -- archives and layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["docker-archive:{d}/busybox.docker.tar",
                                    "oci-archive://{d}/busybox.oci.tar",
                                    "oci:{d}/busybox-layout:1"])
def test_archives_and_layouts_become_runnable_sifs(source: str, oci_images: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "busybox.sif"
    ok("build", out, source.format(d=oci_images))
    assert ok("run", out).stdout == "hello from /bin/sh\n"  # CMD kept, with its $0
    assert ok("run", out, "echo", "args replace CMD").stdout == "args replace CMD\n"
    assert ok("exec", out, "sh", "-c", "echo $GREETING").stdout == "bonjour\n"  # OCI Env
    assert "org.capsid.test: busybox" in ok("inspect", out).stdout
    config = oci_config(out)
    assert config["Cmd"] == ["/bin/sh", "-c", "echo hello from $0"]
    assert config["WorkingDir"] == "/tmp"


def _resave_with_env(original: Path, out: Path, env: str) -> None:
    """*original* (a docker save archive) written to *out* with *env* as its config's Env."""
    import tarfile

    with tarfile.open(original) as src, tarfile.open(out, "w") as dst:
        config_name = json.loads(src.extractfile("manifest.json").read())[0]["Config"]  # type: ignore[union-attr]
        for member in src.getmembers():
            data = src.extractfile(member) if member.isfile() else None
            if member.name == config_name:
                config = json.loads(data.read())  # type: ignore[union-attr]
                config["config"]["Env"] = [env]
                raw = json.dumps(config).encode()
                member.size = len(raw)
                dst.addfile(member, io.BytesIO(raw))
            else:
                dst.addfile(member, data)


def test_archives_and_layouts_run_directly_converted_once_by_content(
        oci_images: Path, oci_env: dict[str, str], tmp_path: Path) -> None:
    """exec/run take docker-archive:, oci-archive: and oci: as Apptainer's do: converted
    once into the cache, keyed by the image's content, so an archive replaced by another
    image at the same path runs the new image."""
    cache = Path(oci_env["CAPSID_CACHEDIR"]) / "sif"
    archive = tmp_path / "app.tar"
    shutil.copy(oci_images / "busybox.docker.tar", archive)
    uri = f"docker-archive:{archive}"
    assert ok("exec", uri, "sh", "-c", "echo $GREETING", env=oci_env).stdout == "bonjour\n"
    (made,) = cache.iterdir()
    stamp = made.stat().st_mtime_ns
    assert ok("run", uri, env=oci_env).stdout == "hello from /bin/sh\n"  # from the cache
    assert [p.stat().st_mtime_ns for p in cache.iterdir()] == [stamp]
    # the same image as an OCI archive and layout: its manifest names it, one more SIF
    for other in (f"oci-archive:{oci_images}/busybox.oci.tar",
                  f"oci:{oci_images}/busybox-layout:1"):
        assert ok("exec", other, "cat", "/etc/group", env=oci_env).returncode == 0
    assert len(list(cache.iterdir())) == 2
    # another image saved over the archive's path: converted, not the stale one served
    _resave_with_env(oci_images / "busybox.docker.tar", archive, "GREETING=hola")
    assert ok("exec", uri, "sh", "-c", "echo $GREETING", env=oci_env).stdout == "hola\n"
    assert len(list(cache.iterdir())) == 3
    archive.unlink()
    error = fails("exec", uri, "true", env=oci_env)
    assert "does not exist" in error


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on loopback: (its base URL, the directory it serves)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_a_sif_on_a_web_server_is_pulled_as_it_is(web: tuple[str, Path], busybox_sif: Path,
                                                   oci_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    base, root = web
    shutil.copy(busybox_sif, root / "tools.sif")
    (root / "page.html").write_text("<html>not an image</html>")
    work = tmp_path / "work"
    work.mkdir()
    ok("pull", f"{base}/tools.sif", env=oci_env, cwd=work)  # Apptainer's name: the file's
    assert (work / "tools.sif").read_bytes() == busybox_sif.read_bytes()
    assert ok("exec", work / "tools.sif", "echo", "fetched", env=oci_env).stdout == "fetched\n"
    ok("pull", "--sandbox", work / "box", f"{base}/tools.sif", env=oci_env)
    assert (work / "box" / "bin" / "busybox").is_file()
    before = sorted(p.name for p in work.iterdir())
    assert "HTTP 404" in fails("pull", work / "gone.sif", f"{base}/missing.sif", env=oci_env)
    assert "is not a SIF or squashfs image" in fails("pull", work / "page.sif",
                                                     f"{base}/page.html", env=oci_env)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing half-written
    assert "pull it first" in fails("exec", f"{base}/tools.sif", "true", env=oci_env)


def test_the_same_archive_gives_the_same_bytes(oci_images: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.sif", tmp_path / "b.sif"
    ok("build", a, f"docker-archive:{oci_images}/busybox.docker.tar")
    ok("build", b, f"docker-archive:{oci_images}/busybox.docker.tar")
    assert a.read_bytes() == b.read_bytes()


def test_whiteouts_written_by_umoci_remove_files(oci_images: Path, tmp_path: Path) -> None:
    need("unsquashfs")
    out, tree = tmp_path / "two.sif", tmp_path / "tree"
    ok("build", out, f"oci:{oci_images}/busybox2-layout:2")
    ok("build", "--sandbox", tree, out)
    assert not (tree / "home").exists()  # .wh.home
    assert not (tree / "etc" / "group").exists()  # .wh.group
    assert (tree / "opt" / "added" / "file").read_text() == "layer2\n"
    assert (tree / "bin" / "busybox").is_file()  # the lower layer shows through


def test_archive_mistakes_are_one_line_errors(oci_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.sif"
    assert "does not exist" in fails("build", out, f"docker-archive:{tmp_path}/none.tar")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    assert "not a tar archive" in fails("build", out, f"oci-archive:{junk}")
    assert "no image tagged" in fails("build", out, f"oci:{oci_images}/busybox-layout:nope")
    assert not out.exists()


def test_a_damaged_layer_is_caught_by_its_digest(oci_images: Path, tmp_path: Path) -> None:
    import shutil

    layout = tmp_path / "layout"
    shutil.copytree(oci_images / "busybox-layout", layout)
    biggest = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[-100] ^= 0x55  # inside the gzip stream's data, not its header
    biggest.chmod(0o644)
    biggest.write_bytes(bytes(data))
    out = tmp_path / "bad.sif"
    error = fails("build", out, f"oci:{layout}:1")
    assert "does not match its digest" in error or "corrupt" in error
    assert not out.exists()


# -- a registry with TLS and htpasswd ------------------------------------------------------------


def test_pull_needs_credentials_and_trust(registry: Registry, oci_env: dict[str, str],
                                          tmp_path: Path) -> None:
    uri = f"docker://{registry.host}/test/busybox:1"
    assert "requires authentication" in fails("pull", tmp_path / "a.sif", uri, env=oci_env)
    untrusting = {k: v for k, v in oci_env.items() if k != "SSL_CERT_FILE"}
    assert "not trusted" in fails("pull", tmp_path / "a.sif", uri, env={**untrusting, **CREDS})
    wrong = {**oci_env, "CAPSID_DOCKER_USERNAME": USER, "CAPSID_DOCKER_PASSWORD": "nope"}
    assert "denied" in fails("pull", tmp_path / "a.sif", uri, env=wrong)
    assert "not found" in fails("pull", tmp_path / "a.sif",
                                f"docker://{registry.host}/test/missing:1",
                                env={**oci_env, **CREDS})


def test_arch_of_an_image_without_an_index(registry: Registry, oci_env: dict[str, str],
                                            tmp_path: Path) -> None:
    """test/busybox:1 is one manifest, for this machine: --arch of another machine is one
    error and no file (it was silently this machine's image); this machine's is taken."""
    from capsid.oci.image import host_platform

    uri = f"docker://{registry.host}/test/busybox:1"
    env = {**oci_env, **CREDS}
    other = "s390x" if host_platform()[0] != "s390x" else "amd64"
    error = fails("pull", "--arch", other, tmp_path / "o.sif", uri, env=env)
    assert f"is an image for linux/{host_platform()[0]} only, not for linux/{other}" in error
    assert not (tmp_path / "o.sif").exists()
    ok("pull", "--arch", host_platform()[0], tmp_path / "h.sif", uri, env=env)
    # the cached manifest is checked too
    assert "only" in fails("pull", "--arch", other, tmp_path / "o.sif", uri, env=env)


def test_login_then_pull_with_the_default_name(registry: Registry, oci_env: dict[str, str],
                                               tmp_path: Path) -> None:
    home = Path(oci_env["HOME"])
    ok("registry", "login", "-u", USER, "--password-stdin", registry.host, env=oci_env,
       input=PASSWORD + "\n")
    stored = home / ".config" / "capsid" / "auth.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert registry.host in json.loads(stored.read_text())["auths"]
    listed = ok("registry", "list", env=oci_env).stdout.splitlines()
    assert listed[0].split() == ["REGISTRY", "USERNAME", "FILE"]
    assert listed[1].split() == [registry.host, USER, str(stored)]
    assert "rejected" in fails("registry", "login", "-u", USER, "-p", "wrong", registry.host,
                               env=oci_env)
    ok("pull", f"docker://{registry.host}/test/busybox:1", env=oci_env, cwd=tmp_path)
    assert ok("run", tmp_path / "busybox_1.sif").stdout == "hello from /bin/sh\n"
    assert "already exists" in fails("pull", tmp_path / "busybox_1.sif",
                                     f"docker://{registry.host}/test/busybox:1", env=oci_env)
    ok("pull", "--force", tmp_path / "busybox_1.sif", f"docker://{registry.host}/test/busybox:1",
       env=oci_env)
    ok("registry", "logout", registry.host, env=oci_env)
    assert registry.host not in json.loads(stored.read_text())["auths"]
    assert ok("registry", "list", env=oci_env).stdout == ""


def test_docker_io_through_a_mirror_runs_python(registry: Registry, oci_env: dict[str, str],
                                                tmp_path: Path) -> None:
    """docker://debian-python3:12 means docker.io/library/…; the site mirror serves it."""
    Path(oci_env["CAPSID_REGISTRIES_CONF"]).write_text(
        f'[[registry]]\nprefix = "docker.io"\n[[registry.mirror]]\n'
        f'location = "{registry.host}/hub"\n')
    out = tmp_path / "py.sif"
    ok("pull", out, "docker://debian-python3:12", env={**oci_env, **CREDS})
    assert ok("exec", out, "python3", "-c", "print(6*9)").stdout == "54\n"
    assert "bootstrap: docker\nfrom: docker.io/library/debian-python3:12" in \
        ok("inspect", "--deffile", out).stdout


def test_exec_docker_uri_converts_once(registry: Registry, oci_env: dict[str, str]) -> None:
    env = {**oci_env, **CREDS}
    uri = f"docker://{registry.host}/test/busybox:1"
    assert ok("exec", uri, "echo", "first", env=env).stdout == "first\n"
    sifs = list((Path(oci_env["CAPSID_CACHEDIR"]) / "sif").iterdir())
    assert len(sifs) == 1
    made = sifs[0].stat().st_mtime_ns
    assert ok("run", uri, env=env).stdout == "hello from /bin/sh\n"
    assert sifs[0].stat().st_mtime_ns == made
    listing = ok("cache", "list", env=env).stdout
    assert "sifs" in listing and "blobs" in listing
    # Apptainer's flags, as job scripts give them: -T/--type and -f/--force
    assert ok("cache", "list", "-T", "oci", env=env).stdout.split()[:2] == ["sifs", "1"]
    blobs = Path(oci_env["CAPSID_CACHEDIR"]) / "oci" / "blobs" / "sha256"
    kept = sorted(blobs.iterdir())
    assert kept
    ok("cache", "clean", "-f", "--type", "oci", env=env)
    assert not list((Path(oci_env["CAPSID_CACHEDIR"]) / "sif").iterdir())
    assert sorted(blobs.iterdir()) == kept  # only the converted SIFs went
    assert "unknown cache type 'library2'" in fails("cache", "clean", "-T", "library2", env=env)
    ok("cache", "clean", "--force", env=env)
    assert not list(blobs.iterdir())


def test_a_pull_shares_its_sif_with_the_cache_until_it_is_changed(
        registry: Registry, oci_env: dict[str, str], tmp_path: Path) -> None:
    """The first pull's output is the cached SIF under a second name (no copy); a SIF
    changed in place through that name is made again, never handed out."""
    env = {**oci_env, **CREDS}
    uri = f"docker://{registry.host}/test/busybox:1"
    cache = Path(oci_env["CAPSID_CACHEDIR"]) / "sif"
    first = tmp_path / "first.sif"
    ok("pull", first, uri, env=env)
    (cached,) = cache.iterdir()
    assert first.stat().st_ino == cached.stat().st_ino
    assert first.stat().st_mode & 0o777 == 0o755  # the tests' umask is 022
    pristine = hashlib.sha256(first.read_bytes()).hexdigest()
    second = tmp_path / "second.sif"
    ok("pull", second, uri, env=env)  # from the cache: a copy, so the outputs stay apart
    assert second.stat().st_ino != first.stat().st_ino
    assert hashlib.sha256(second.read_bytes()).hexdigest() == pristine
    time.sleep(0.02)
    with open(first, "ab") as f:  # what adding an overlay or a signature in place does
        f.write(b"\0" * 4096)
    third = tmp_path / "third.sif"
    made = ok("-v", "pull", third, uri, env=env).stderr
    assert "was changed since it was made" in made
    assert hashlib.sha256(third.read_bytes()).hexdigest() == pristine
    assert first.stat().st_size == second.stat().st_size + 4096  # the user's file is kept
    (cached,) = cache.iterdir()
    assert cached.stat().st_ino == third.stat().st_ino != first.stat().st_ino
    assert ok("exec", uri, "echo", "intact", env=env).stdout == "intact\n"
    assert ok("pull", "--force", third, uri, env=env).returncode == 0
    assert hashlib.sha256(third.read_bytes()).hexdigest() == pristine
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".capsid-tmp")]


# -- token auth ----------------------------------------------------------------------------------


def test_bearer_token_flow(pki: Path, oci_images: Path, oci_env: dict[str, str],
                           tmp_path: Path) -> None:
    need("docker-registry", "skopeo")
    reg = Registry(tmp_path / "token-registry", pki, auth="token")
    try:
        reg.skopeo_copy(f"oci-archive:{oci_images}/busybox.oci.tar", "team/busybox:1")
        uri = f"docker://{reg.host}/team/busybox:1"
        assert "requires authentication" in fails("pull", tmp_path / "a.sif", uri, env=oci_env)
        before = reg.token.requests if reg.token else 0
        ok("pull", tmp_path / "b.sif", uri, env={**oci_env, **CREDS})
        assert reg.token is not None and reg.token.requests > before
        assert ok("run", tmp_path / "b.sif").stdout == "hello from /bin/sh\n"
        ok("push", tmp_path / "b.sif", f"oras://{reg.host}/team/busybox-sif:1",
           env={**oci_env, **CREDS})
    finally:
        reg.stop()


# -- failures on the way: retry and resume ---------------------------------------------------------


def test_downloads_resume_after_the_connection_drops(registry: Registry, oci_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    proxy = CuttingProxy(registry.port, after=4 << 20, cuts=3)
    try:
        out = tmp_path / "py.sif"
        ok("pull", out, f"docker://127.0.0.1:{proxy.port}/test/debian-python3:12",
           env={**oci_env, **CREDS})
        assert proxy.cuts_done == 3
        blobs = Path(oci_env["CAPSID_CACHEDIR"]) / "oci" / "blobs" / "sha256"
        layer_bytes = max(p.stat().st_size for p in blobs.iterdir())
        # resumed with Range, not restarted: little more than the layer crossed the proxy
        assert proxy.bytes_down < layer_bytes * 1.2, (proxy.bytes_down, layer_bytes)
        assert not list((Path(oci_env["CAPSID_CACHEDIR"]) / "partial").iterdir())
        assert ok("exec", out, "python3", "-c", "print(6*9)").stdout == "54\n"
    finally:
        proxy.stop()


# -- the cache under concurrency and kill -9 ------------------------------------------------------


def _layer_digest(registry: Registry, repo: str, env: dict[str, str]) -> str:
    out = subprocess.run(["skopeo", "inspect", "--cert-dir", str(registry.cert_dir()), "--creds",
                          f"{USER}:{PASSWORD}", f"docker://{registry.host}/{repo}"],
                         capture_output=True, text=True, check=True, env=env).stdout
    return str(json.loads(out)["Layers"][0])


def test_32_ranks_pulling_at_once_download_each_blob_once(registry: Registry,
                                                          oci_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    env = {**oci_env, **CREDS}
    layer = _layer_digest(registry, "test/busybox:1", env)
    before = registry.blob_gets(layer)
    procs = [subprocess.Popen([str(CAPSID), "pull", str(tmp_path / f"rank{i}.sif"),
                               f"docker://{registry.host}/test/busybox:1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(32)]
    results = [(p.wait(180), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert registry.blob_gets(layer) - before == 1
    first = (tmp_path / "rank0.sif").read_bytes()
    assert all((tmp_path / f"rank{i}.sif").read_bytes() == first for i in range(32))
    cache = Path(oci_env["CAPSID_CACHEDIR"])
    assert len(list((cache / "sif").iterdir())) == 1
    assert not list((cache / "partial").iterdir())


def _cache_is_consistent(cache: Path) -> None:
    for blob in (cache / "oci" / "blobs" / "sha256").iterdir():
        if blob.name.startswith(".tmp-"):
            continue
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    for sif in (cache / "sif").glob("*.sif"):
        with SifImage(sif) as s:
            part = s.primary_partition()
            assert part is not None and part.offset + part.size <= sif.stat().st_size


def test_kill_9_at_any_point_leaves_the_cache_usable(registry: Registry, oci_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    env = {**oci_env, **CREDS}
    uri = f"docker://{registry.host}/test/debian-python3:12"
    cache = Path(oci_env["CAPSID_CACHEDIR"])
    rng = random.Random(1234)
    for attempt in range(5):
        proc = subprocess.Popen([str(CAPSID), "pull", str(tmp_path / f"k{attempt}.sif"), uri],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(0.2, 2.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _cache_is_consistent(cache)
        out = tmp_path / f"k{attempt}.sif"
        if out.exists():  # the kill came after the rename: the output must be whole
            cached = list((cache / "sif").glob("*.sif"))
            assert len(cached) == 1 and out.read_bytes() == cached[0].read_bytes()
    out = tmp_path / "final.sif"
    ok("pull", out, uri, env=env)
    _cache_is_consistent(cache)
    assert ok("exec", out, "python3", "-c", "print(6*9)").stdout == "54\n"


# -- pushing ---------------------------------------------------------------------------------------


def test_push_oras_round_trips_the_sif(registry: Registry, oci_env: dict[str, str],
                                       busybox_sif: Path, tmp_path: Path) -> None:
    env = {**oci_env, **CREDS}
    ref = f"{registry.host}/test/busybox-sif:1"
    ok("push", busybox_sif, f"oras://{ref}", env=env)
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--cert-dir", str(registry.cert_dir()), "--creds",
         f"{USER}:{PASSWORD}", f"docker://{ref}"], capture_output=True, text=True,
        check=True).stdout)
    assert manifest["config"]["mediaType"] == "application/vnd.sylabs.sif.config.v1+json"
    assert manifest["layers"][0]["mediaType"] == "application/vnd.sylabs.sif.layer.v1.sif"
    assert manifest["layers"][0]["annotations"]["org.opencontainers.image.title"] == \
        busybox_sif.name
    ok("pull", tmp_path / "back.sif", f"oras://{ref}", env=env)
    assert (tmp_path / "back.sif").read_bytes() == busybox_sif.read_bytes()
    assert ok("exec", f"oras://{ref}", "echo", "via oras", env=env).stdout == "via oras\n"


def test_push_docker_makes_an_image_other_tools_read(registry: Registry, oci_env: dict[str, str],
                                                     oci_images: Path, tmp_path: Path) -> None:
    env = {**oci_env, **CREDS}
    src = tmp_path / "src.sif"
    ok("build", src, f"oci-archive:{oci_images}/busybox.oci.tar")
    ref = f"{registry.host}/test/pushed:1"
    ok("push", src, f"docker://{ref}", env=env)
    info = json.loads(subprocess.run(
        ["skopeo", "inspect", "--cert-dir", str(registry.cert_dir()), "--creds",
         f"{USER}:{PASSWORD}", f"docker://{ref}"], capture_output=True, text=True,
        check=True).stdout)
    assert info["Architecture"] == "amd64" and len(info["Layers"]) == 1
    assert "GREETING=bonjour" in info["Env"]
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-cert-dir",
                    str(registry.cert_dir()), "--src-creds", f"{USER}:{PASSWORD}",
                    f"docker://{ref}", f"oci:{copied}:1"], check=True, capture_output=True,
                   env={**env, "TMPDIR": str(tmp_path)})
    out = tmp_path / "again.sif"
    ok("build", out, f"oci:{copied}:1")
    assert ok("run", out).stdout == "hello from /bin/sh\n"
    if os.geteuid() == 0 and subprocess.run(["which", "buildah"],
                                            capture_output=True).returncode == 0:
        pulled = subprocess.run(["buildah", "pull", "--quiet", "--cert-dir",
                                 str(registry.cert_dir()), "--creds", f"{USER}:{PASSWORD}",
                                 f"docker://{ref}"], capture_output=True, text=True,
                                env={**env, "STORAGE_DRIVER": "vfs"})
        assert pulled.returncode == 0, pulled.stderr
        subprocess.run(["buildah", "rmi", pulled.stdout.strip()], capture_output=True,
                       env={**env, "STORAGE_DRIVER": "vfs"})


def test_docker_25_save_format_is_read(oci_images: Path, tmp_path: Path) -> None:
    """Docker ≥ 25 saves an OCI layout plus the legacy manifest.json pointing into blobs/."""
    import tarfile

    layout = oci_images / "busybox-layout"
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    legacy = [{"Config": "blobs/sha256/" + manifest["config"]["digest"].split(":", 1)[1],
               "RepoTags": ["capsid-test/busybox:25"],
               "Layers": ["blobs/sha256/" + d["digest"].split(":", 1)[1]
                          for d in manifest["layers"]]}]
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        for item in ("blobs", "index.json", "oci-layout"):
            tar.add(layout / item, item)
        tar.add(tmp_path / "manifest.json", "manifest.json")
    out = tmp_path / "d25.sif"
    ok("build", out, f"docker-archive:{archive}:capsid-test/busybox:25")
    assert ok("run", out).stdout == "hello from /bin/sh\n"
