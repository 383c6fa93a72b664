"""The one opener and the private-directory rule (#19), on a cache that steers containers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsid import config
from capsid.mpi import host


def test_host_mpi_cache_is_read_only_from_a_private_folder(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A cached closure names the libraries bound into every rank: one in a folder others
    may write (or that is a link, or a FIFO) is not used; the caller's own is."""
    monkeypatch.setattr(config, "cache_root", lambda: str(tmp_path / "cache"))
    mpi = host.HostMPI("Open MPI 4.1.4", "libmpi.so.40", {"libmpi.so.40": "/bin/sh"})
    host._store("key", mpi)
    folder = tmp_path / "cache" / "hostmpi"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    cached = host._cached("key")
    assert cached is not None and cached.libraries == {"libmpi.so.40": "/bin/sh"}
    folder.chmod(0o777)
    assert host._cached("key") is None
    folder.chmod(0o700)
    entry = folder / "key.json"
    entry.unlink()
    os.mkfifo(entry)
    assert host._cached("key") is None  # not waited on
    entry.unlink()
    entry.symlink_to(tmp_path / "elsewhere.json")
    assert host._cached("key") is None
