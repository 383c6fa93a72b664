"""Hostile images and careless input (#10): nothing outside the container or the output
changes, and every failure is one clear line, never an internal error.

Run as root and as an ordinary user (scripts/test.sh runs the suite both ways).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CAPSID, one_error, run_capsid

pytestmark = pytest.mark.unprivileged


def listing(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under *roots* with its type and size: what 'nothing changed' compares."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                seen[path] = (st.st_mode, st.st_size if not os.path.isdir(path) else 0)
    return seen


@pytest.fixture
def make_image(busybox_sandbox: Path, tmp_path: Path) -> Callable[..., Path]:
    """A SIF of the busybox sandbox after *change* was applied to a copy of it."""
    count = 0

    def make(change: Callable[[Path], None]) -> Path:
        nonlocal count
        count += 1
        root = tmp_path / f"rootfs{count}"
        shutil.copytree(busybox_sandbox, root, symlinks=True)
        change(root)
        out = tmp_path / f"hostile{count}.sif"
        run_capsid("build", out, root, check=True)
        return out

    return make


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A host directory that no container may change: it must stay as it is."""
    d = tmp_path / "sentinel"
    d.mkdir()
    (d / "keep").write_text("host file\n")
    os.chmod(tmp_path, 0o755)  # reachable for the checks, as /tmp is
    return d


def _chain(root: Path, start: str, length: int, target: str, absolute: bool) -> None:
    """/start -> n0 -> n1 -> ... -> n{length-1} -> target."""
    def name(i: int) -> str:
        return f"/n{i}" if absolute else f"n{i}"
    (root / start).symlink_to(name(0))
    for i in range(length - 1):
        (root / f"n{i}").symlink_to(name(i + 1))
    (root / f"n{length - 1}").symlink_to(target)


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
@pytest.mark.parametrize("overlay", [False, True], ids=["tmpfs", "overlay-dir"])
def test_long_symlink_chain_cannot_reach_the_host(make_image: Callable[..., Path],
                                                  sentinel: Path, tmp_path: Path,
                                                  absolute: bool, overlay: bool) -> None:
    """#10.1: a bind destination behind 46 links ending in ../oldroot/<host dir>."""
    image = make_image(lambda root: _chain(root, "data", 46, f"../oldroot{sentinel}",
                                           absolute))
    source = tmp_path / "src"
    source.mkdir()
    before = listing(sentinel)
    options = ["-B", f"{source}:/data/newdir"]
    if overlay:
        (tmp_path / "ov").mkdir()
        options += ["--overlay", str(tmp_path / "ov")]
    result = run_capsid("exec", *options, image, "true")
    one_error(result, "/data/newdir", "too many levels of symbolic links")
    assert listing(sentinel) == before
    assert listing(source) == {}


def test_short_chain_to_oldroot_stays_inside(make_image: Callable[..., Path], sentinel: Path,
                                            tmp_path: Path) -> None:
    """Within the link limit, '..' stops at the container's root: the bind lands inside it."""
    image = make_image(lambda root: _chain(root, "data", 5, f"../oldroot{sentinel}", False))
    source = tmp_path / "src"
    source.mkdir()
    (source / "mark").write_text("bound\n")
    before = listing(sentinel)
    result = run_capsid("exec", "-B", f"{source}:/data/newdir", image, "cat",
                        f"/oldroot{sentinel}/newdir/mark", "/data/newdir/mark")
    assert (result.returncode, result.stdout) == (0, "bound\nbound\n"), result.stderr
    assert listing(sentinel) == before


@pytest.mark.parametrize("link", ["loop", "/data", "pong/x"])
def test_symlink_loops_are_refused(make_image: Callable[..., Path], tmp_path: Path,
                                   link: str) -> None:
    def change(root: Path) -> None:
        (root / "data").symlink_to(link)
        (root / "ping").symlink_to("pong")
        (root / "pong").symlink_to("ping")
        (root / "loop").symlink_to("loop")
    image = make_image(change)
    result = run_capsid("exec", "-B", f"{tmp_path}:/data", image, "true")
    one_error(result, "/data", "too many levels")


def test_default_mounts_through_hostile_links_are_skipped(make_image: Callable[..., Path],
                                                          sentinel: Path) -> None:
    """/etc/passwd and /etc/resolv.conf behind hostile links: skipped or kept inside."""
    def change(root: Path) -> None:
        (root / "etc" / "resolv.conf").unlink()
        _chain(root, "etc/resolv.conf", 45, f"../oldroot{sentinel}/keep", False)
        (root / "etc" / "passwd").unlink()
        (root / "etc" / "passwd").symlink_to(f"../../oldroot{sentinel}/keep")
    image = make_image(change)
    before = listing(sentinel)
    result = run_capsid("exec", image, "sh", "-c", "id -un; cat /etc/passwd")
    assert result.returncode == 0, result.stderr
    assert "host file" not in result.stdout  # the host's file was never read for it
    assert "internal error" not in result.stderr
    assert listing(sentinel) == before


def test_bind_onto_a_file_where_the_source_is_a_directory(busybox_sif: Path,
                                                         tmp_path: Path) -> None:
    result = run_capsid("exec", "-B", f"{tmp_path}:/bin/busybox", busybox_sif, "true")
    one_error(result, "/bin/busybox", "is a file in the image")


def _peak_rss_mib(argv: list[str]) -> tuple[int, float, str]:
    """(exit status, peak RSS in MiB of the command and what it waited for, stderr)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, err.read().decode()


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_decompression_bombs_convert_in_bounded_memory(busybox_sandbox: Path, tmp_path: Path,
                                                       kind: str) -> None:
    """#10.2: a 1 GiB-of-zeros layer (33 KB as zstd, 1 MB as gzip) used to take 1 GiB of
    memory (an 8 GiB zstd one: MemoryError). scripts/bombs.sh runs the full sizes."""
    from tests.support.bombs import MEDIA, bomb_layer, make_layout, tar_of

    size = 1 << 30
    layout = tmp_path / "layout"
    make_layout(layout, [(tar_of(busybox_sandbox), MEDIA["plain"]),
                         (bomb_layer(size, kind), MEDIA[kind])])
    out = tmp_path / "bomb.sif"
    status, peak, stderr = _peak_rss_mib([str(CAPSID), "build", str(out), f"oci:{layout}"])
    assert status == 0, stderr
    assert peak < 256, f"peak RSS {peak:.0f} MiB"
    check = run_capsid("exec", out, "sh", "-c",
                       "stat -c %s /zeros; tail -c 65536 /zeros | tr -d '\\000' | wc -c")
    assert check.stdout.split() == [str(size), "0"], check.stderr


@pytest.fixture
def special_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO with no writer (opening it for reading the usual way blocks) and a socket."""
    import socket

    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "image.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return {"FIFO": fifo, "socket": sock_path}


@pytest.mark.parametrize("kind", ["FIFO", "socket"])
@pytest.mark.parametrize("command", [
    "exec {} true", "inspect {}", "sif list {}", "sif info 1 {}", "sif dump 1 {}",
    "sif header {}", "build --sandbox {out} {}", "build {out} {}",
    "build {out} docker-archive:{}", "build {out} oci-archive:{}", "run {}",
    "build --format def {out} {}",
])
def test_special_files_as_images_are_refused_not_waited_on(
        special_files: dict[str, Path], tmp_path: Path, kind: str, command: str) -> None:
    """#10.3: a FIFO given as an image or archive hung every command."""
    out = tmp_path / "out"
    argv = command.format(special_files[kind], out=out).split()
    result = run_capsid(*argv, timeout=20)
    one_error(result, kind)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_sif_is_one_line_for_every_command(busybox_sif: Path,
                                                      tmp_path: Path) -> None:
    """#10.6: 'sif list' of an unreadable file was an internal error (PermissionError)."""
    image = tmp_path / "locked.sif"
    shutil.copy(busybox_sif, image)
    image.chmod(0)
    for argv in (["sif", "list"], ["sif", "header"], ["inspect"], ["exec"],
                 ["build", "--sandbox", str(tmp_path / "sb")]):
        extra = ["true"] if argv == ["exec"] else []
        one_error(run_capsid(*argv, image, *extra), "permission denied")


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_sif_metadata_objects(busybox_sif: Path, tmp_path: Path) -> None:
    """#10.6: inspect of a SIF whose JSON holds 0xff bytes, or overlaps the filesystem."""
    from capsid.image import sif
    from capsid.image.siftable import DESCRIPTOR

    with sif.SifImage(busybox_sif) as s:
        meta = s.find(sif.DataType.GENERIC_JSON, "inspect-metadata.json")
        part = s.primary_partition()
        table = s.header.descriptors_offset
        index = s.descriptors.index(meta) if meta else -1
    assert meta is not None and part is not None
    garbled = tmp_path / "ff.sif"
    shutil.copy(busybox_sif, garbled)
    _patch(garbled, meta.offset, b"\xff" * min(meta.size, 64))
    one_error(run_capsid("inspect", garbled), "inspect-metadata.json")
    # The descriptor's offset moved into the squashfs partition (offset field at byte 17).
    overlapping = tmp_path / "overlap.sif"
    shutil.copy(busybox_sif, overlapping)
    _patch(overlapping, table + index * DESCRIPTOR.size + 17,
           part.offset.to_bytes(8, "little"))
    one_error(run_capsid("inspect", "--all", overlapping), "inspect-metadata.json")
    # The image itself still runs: the metadata is not on the start path.
    assert run_capsid("exec", overlapping, "true").returncode == 0


@pytest.mark.parametrize("target", ["missing", "file", "root", "slash", "others"])
def test_odd_overlay_targets(busybox_sif: Path, tmp_path: Path, target: str) -> None:
    """#10.7: --overlay on a file, /, a root-owned or another user's directory was an internal
    error; a missing directory was created silently."""
    paths = {"missing": tmp_path / "nowhere", "file": tmp_path / "file", "root": Path("/etc"),
             "slash": Path("/"), "others": tmp_path / "others"}
    (tmp_path / "file").write_text("x")
    (tmp_path / "others").mkdir(mode=0o555)  # a directory the user may not write to
    if target in ("root", "others") and os.geteuid() == 0:
        pytest.skip("root may write to it")
    words = {"missing": "does not exist", "file": "not an overlay image", "root": "cannot write",
             "slash": "cannot be /", "others": "cannot write"}[target]
    result = run_capsid("exec", "--overlay", paths[target], busybox_sif, "true")
    one_error(result, words)
    assert not (tmp_path / "nowhere").exists()


def test_hostile_cli_input(busybox_sif: Path, tmp_path: Path) -> None:
    """#10.8: --hostname of 300 characters; a non-UTF-8 --env-file (its bytes pass through)."""
    one_error(run_capsid("exec", "--hostname", "h" * 300, busybox_sif, "true"),
                    "--hostname", "64")
    env_file = tmp_path / "env"
    env_file.write_bytes(b"LATIN=caf\xe9\nPLAIN=yes\n")
    result = subprocess.run([str(CAPSID), "exec", "--env-file", str(env_file),
                             str(busybox_sif), "sh", "-c", 'printf "%s|%s" "$LATIN" "$PLAIN"'],
                            capture_output=True, check=False)
    assert (result.returncode, result.stdout) == (0, b"caf\xe9|yes"), result.stderr


@pytest.mark.parametrize(("name", "value", "command"), [
    ("CAPSID_RETRY_DELAY", "abc", ["pull", "{out}", "docker://127.0.0.1:9/x:1"]),
    ("CAPSID_RETRY_DELAY", "-1", ["pull", "{out}", "docker://127.0.0.1:9/x:1"]),
])
def test_bad_tuning_variables(tmp_path: Path, name: str, value: str,
                              command: list[str]) -> None:
    env = dict(os.environ, **{name: value}, CAPSID_CACHEDIR=str(tmp_path / "cache"))
    argv = [c.format(out=tmp_path / "out.sif") for c in command]
    one_error(run_capsid(*argv, env=env, timeout=30), name)


def test_a_fifo_as_site_configuration_is_refused(busybox_sif: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "capsid.conf"
    os.mkfifo(fifo)
    result = run_capsid("exec", busybox_sif, "true", timeout=20,
                        env=dict(os.environ, CAPSID_CONFIG=str(fifo)))
    one_error(result, str(fifo), "not a regular file")


@pytest.mark.parametrize("line", ["mount dev = sometimes", "sessiondir max size = big",
                                  "mount home = perhaps", "no equals sign here"])
def test_bad_site_configuration_is_refused(busybox_sif: Path, tmp_path: Path,
                                           line: str) -> None:
    """#10.8: 'mount dev = sometimes' was accepted silently."""
    conf = tmp_path / "capsid.conf"
    conf.write_text(f"# site\n{line}\n")
    result = run_capsid("exec", busybox_sif, "true", env=dict(os.environ,
                                                              CAPSID_CONFIG=str(conf)))
    one_error(result, str(conf))


def test_damaged_data_blocks_say_the_image_is_damaged(busybox_sif: Path,
                                                      tmp_path: Path) -> None:
    """#10.11: 'cannot run /bin/true: Input/output error; check that it is an executable'."""
    from capsid.image.locate import locate

    image = locate(busybox_sif)
    damaged = tmp_path / "damaged.sif"
    data = bytearray(busybox_sif.read_bytes())
    # Data blocks come first after the superblock, busybox's among them; the tables that
    # mounting needs lie at the end. Garble the first half of the data.
    start = image.offset + 512
    data[start:image.offset + image.size // 2] = bytes(image.size // 2 - 512)
    damaged.write_bytes(bytes(data))
    one_error(run_capsid("exec", damaged, "/bin/true", timeout=30), "damaged")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read /proc/1/root")
def test_unreachable_bind_source_says_permission_denied(busybox_sif: Path) -> None:
    """#10.11: '-B /proc/1/root:/host' said 'does not exist'."""
    one_error(run_capsid("exec", "-B", "/proc/1/root:/host", busybox_sif, "true"),
                    "/proc/1/root", "permission denied")


@pytest.mark.parametrize("options", [["-B", "{tmp}:/"], ["--home", "{tmp}:/"]])
def test_replacing_the_root_is_warned_about(busybox_sif: Path, tmp_path: Path,
                                            options: list[str]) -> None:
    """#10.11: -B /:/ and --home / replaced the container's root silently."""
    argv = [o.format(tmp=tmp_path) for o in options]
    result = run_capsid("exec", *argv, busybox_sif, "true")
    assert "replaces the container's whole root" in result.stderr, result.stderr
    assert "internal error" not in result.stderr


def _docker_archive(path: Path, manifest: object, config: object, layer: bytes) -> None:
    """A docker save archive with the given manifest.json and config (any JSON)."""
    import io
    import json
    import tarfile

    config_raw = json.dumps(config).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("manifest.json", json.dumps(manifest).encode()),
                           ("config.json", config_raw), ("layer/layer.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good_config(layer: bytes) -> dict[str, object]:
    import hashlib

    return {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers",
                       "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]}}


@pytest.mark.parametrize("case", ["good", "manifest-list-of-numbers", "manifest-object",
                                  "layers-not-strings", "Env-5", "Labels-list", "config-abc",
                                  "rootfs-x", "Cmd-string", "created-number"])
def test_hostile_archive_fields(busybox_sandbox: Path, tmp_path: Path, case: str) -> None:
    """#10.5: manifest.json of [1,2], "Env": 5, "Labels": [1], "config": "abc", "rootfs": "x"
    were internal errors."""
    from tests.support.bombs import tar_of

    layer = tar_of(busybox_sandbox)
    config: dict[str, object] = _good_config(layer)
    manifest: object = [{"Config": "config.json", "RepoTags": ["x:1"],
                         "Layers": ["layer/layer.tar"]}]
    run = dict(config["config"])  # type: ignore[call-overload]
    if case == "manifest-list-of-numbers":
        manifest = [1, 2]
    elif case == "manifest-object":
        manifest = {"Config": "config.json"}
    elif case == "layers-not-strings":
        manifest = [{"Config": "config.json", "Layers": [7]}]
    elif case in ("Env-5", "Labels-list", "Cmd-string"):
        key, value = {"Env-5": ("Env", 5), "Labels-list": ("Labels", [1]),
                      "Cmd-string": ("Cmd", "sh")}[case]
        run[key] = value
    elif case == "config-abc":
        run = "abc"  # type: ignore[assignment]
    elif case == "rootfs-x":
        config["rootfs"] = "x"
    elif case == "created-number":
        config["created"] = 12
    config["config"] = run
    archive = tmp_path / "x.tar"
    _docker_archive(archive, manifest, config, layer)
    result = run_capsid("build", tmp_path / "out.sif", f"docker-archive:{archive}")
    if case == "good":
        assert result.returncode == 0, result.stderr
        return
    field = case.split("-")[0] if case.split("-")[0] not in ("manifest", "layers") \
        else "manifest.json"
    one_error(result, field)
    assert not (tmp_path / "out.sif").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads /etc/shadow and /dev/mem anyway")
def test_file_capabilities_and_device_nodes_in_an_image_are_inert(debian_sif: Path) -> None:
    """The test image holds a busybox with cap_dac_override+ep and /opt/mem (char 1:1)."""
    result = run_capsid("exec", debian_sif, "sh", "-c",
                        "ls -l /opt/mem | cut -c1; "
                        "/usr/local/caps/busybox cat /etc/shadow >/dev/null 2>&1; echo $?; "
                        "head -c 1 /opt/mem >/dev/null 2>&1; echo $?; "
                        "grep -E '^Cap(Eff|Prm)' /proc/self/status | awk '{print $2}'")
    lines = result.stdout.split()
    assert lines[0] == "c", result.stderr  # the device node is there...
    assert lines[1] != "0" and lines[2] != "0"  # ...but neither it nor the capability works
    assert lines[3:] == ["0000000000000000", "0000000000000000"]
