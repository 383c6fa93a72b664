"""What a start must share with a kept image server to join it (the key), and the
linger setting."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from capsid import config
from capsid.errors import CapsidError
from capsid.image.locate import SIF, Image
from capsid.runtime import imagekeeper


def _key(image: Image, server: str = "/usr/bin/squashfuse_ll", fakeroot: bool = False,
         subordinate_ids: bool = True) -> bytes:
    return imagekeeper._key(image, server, fakeroot=fakeroot, subordinate_ids=subordinate_ids)


def test_the_key_changes_with_the_image_the_server_and_the_id_mapping(tmp_path: Path) -> None:
    path = tmp_path / "a.sif"
    path.write_bytes(b"one")
    image = Image(str(path), SIF, offset=4096)
    key = _key(image)
    assert key == _key(image)
    assert key != _key(Image(str(path), SIF, offset=8192))
    assert key != _key(image, server="/opt/squashfuse_ll")
    assert key != _key(image, fakeroot=True)
    assert key != _key(image, subordinate_ids=False)
    stat = path.stat()
    with open(path, "r+b") as f:  # the same inode and size, other bytes and time
        f.write(b"two")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert key != _key(image)
    changed = _key(image)
    path.unlink()
    path.write_bytes(b"two")  # another file by that name
    assert _key(image) not in (key, changed)


def test_linger_comes_from_the_environment_then_the_site(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.delenv("CAPSID_IMAGE_LINGER", raising=False)
    assert imagekeeper.linger(config.SiteConfig()) == imagekeeper.DEFAULT_LINGER
    site = config.SiteConfig()
    site.values["image server linger"] = "2.5"
    assert imagekeeper.linger(site) == 2.5
    monkeypatch.setenv("CAPSID_IMAGE_LINGER", "0")
    assert imagekeeper.linger(site) == 0
    site.values["image server linger"] = "-1"
    with pytest.raises(CapsidError, match="image server linger"):
        imagekeeper.linger(site)


def test_no_keeper_is_looked_for_when_linger_is_zero(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="k-"))  # short: a socket's name has 107 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("CAPSID_IMAGE_LINGER", "0")
    path = tmp_path / "a.sif"
    path.write_bytes(b"x")
    try:
        assert imagekeeper.find(Image(str(path), SIF), "/bin/true", fakeroot=False,
                                subordinate_ids=True, site=config.SiteConfig()) is None
        monkeypatch.setenv("CAPSID_IMAGE_LINGER", "5")
        keeping = imagekeeper.find(Image(str(path), SIF), "/bin/true", fakeroot=False,
                                   subordinate_ids=True, site=config.SiteConfig())
        assert keeping is not None and keeping.linger == 5
        assert keeping.address.startswith(f"{runtime}/capsid/images/")
        assert keeping.join() is None  # nobody answers there
    finally:
        shutil.rmtree(runtime)
