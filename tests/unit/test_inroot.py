"""Paths resolved inside an image root: symlinks, '..', chains and loops never leave it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsid import inroot


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A root with the tricks a hostile image plays, and a host file beside it."""
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_text("inside")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "host-secret").write_text("outside")
    (root / "up").symlink_to("../../../host-secret")
    (root / "abs").symlink_to("/../../host-secret")
    (root / "bin").symlink_to("usr/bin")
    (root / "loop").symlink_to("loop")
    (root / "pingpong").symlink_to("pong")
    (root / "pong").symlink_to("pingpong")
    return root


def _walk(root: Path, path: str) -> tuple[str, list[str]]:
    with inroot.walk_path(str(root), path) as found:
        return found.inside, list(found.missing)


def test_links_resolve_as_in_a_chroot(tree: Path) -> None:
    assert _walk(tree, "/bin/tool") == ("/usr/bin/tool", [])
    # bin/.. is /usr, as the kernel resolves it: .. applies to the link's target
    assert _walk(tree, "bin/../etc/./passwd") == ("/usr", ["etc", "passwd"])
    assert _walk(tree, "/../../etc/passwd") == ("/etc/passwd", [])


def test_dotdot_and_absolute_targets_stop_at_the_root(tree: Path) -> None:
    assert _walk(tree, "/up") == ("/", ["host-secret"])
    assert _walk(tree, "/abs/x") == ("/", ["host-secret", "x"])


def test_missing_components_are_listed_in_order(tree: Path) -> None:
    assert _walk(tree, "/usr/share/doc/../man") == ("/usr", ["share", "man"])


@pytest.mark.parametrize("path", ["/loop", "/pingpong/x", "/loop/../etc"])
def test_loops_are_refused(tree: Path, path: str) -> None:
    with pytest.raises(inroot.Unresolvable, match="too many levels of symbolic links"):
        _walk(tree, path)


@pytest.mark.parametrize("absolute", [False, True])
def test_a_chain_longer_than_the_kernel_limit_is_refused(tmp_path: Path, absolute: bool) -> None:
    """The escape of #10: 46 links, the last pointing out of the root."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "x").mkdir()
    for i in range(45):
        (root / f"n{i}").symlink_to(f"/n{i + 1}" if absolute else f"n{i + 1}")
    (root / "n45").symlink_to("../x")
    (root / "data").symlink_to("/n0" if absolute else "n0")
    with pytest.raises(inroot.Unresolvable):
        _walk(root, "/data/newdir")
    # A chain within the limit resolves, and '..' stays inside.
    assert _walk(root, "/n10") == ("/", ["x"])


def test_a_file_used_as_a_directory_is_refused(tree: Path) -> None:
    with pytest.raises(inroot.Unresolvable, match="is not a directory"):
        _walk(tree, "/etc/passwd/x")


def test_open_file_reads_regular_files_only(tree: Path, tmp_path: Path) -> None:
    os.mkfifo(tree / "fifo")
    root_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = inroot.open_file(root_fd, "/bin/tool")
        assert fd is not None
        with open(fd, "rb") as f:
            assert f.read() == b"inside"
        for path in ("/fifo", "/usr", "/up", "/loop", "/missing", "/"):
            assert inroot.open_file(root_fd, path) is None, path
    finally:
        os.close(root_fd)


def test_walks_close_what_they_open(tree: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for path in ("/bin/tool", "/up", "/usr/x/y"):
        _walk(tree, path)
    with pytest.raises(inroot.Unresolvable):
        _walk(tree, "/loop")
    assert len(os.listdir("/proc/self/fd")) == before
