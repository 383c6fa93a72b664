"""Atomic outputs: write beside the target under a temporary name, then rename.

An interrupted or failed write (Ctrl-C, a full disk, a tool error) leaves the
target as it was: absent, or the old version when ``--force`` was given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from capsid.errors import CapsidError, OutputExistsError


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing *target* without *force*, and a parent that is missing."""
    if os.path.lexists(target) and not force:
        raise OutputExistsError(f"{target} already exists", "use --force to overwrite it")
    parent = target.parent
    if not parent.is_dir():
        raise CapsidError(f"directory {parent} does not exist",
                          "create it first or choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CapsidError(f"cannot write to directory {parent}: permission denied",
                          "choose an output path in a directory you can write to")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # A sandbox may hold read-only directories: make them writable to delete them.
        for root, dirs, _files in os.walk(path):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside *target*; on success fsync it and rename it over."""
    check_target(target, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".capsid-tmp",
                               dir=target.parent)
    os.close(fd)
    path = Path(tmp)
    try:
        yield path
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(path, 0o666 & ~_umask())
        if target.is_dir() and not target.is_symlink():
            _remove(target)
        os.replace(path, target)
    except BaseException:
        _remove(path)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory path (not yet created) beside *target*; rename on success."""
    check_target(target, force)
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".capsid-tmp",
                                   dir=target.parent))
    path = holder / "rootfs"
    try:
        yield path
        old = None
        if os.path.lexists(target):
            old = holder / "old"
            os.rename(target, old)
        os.rename(path, target)
    finally:
        _remove(holder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
