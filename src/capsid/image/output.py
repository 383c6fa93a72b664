"""Atomic outputs: write beside the target under a temporary name, then rename.

An interrupted or failed write (Ctrl-C, a full disk, a tool error) leaves the
target as it was: absent, or the old version when ``--force`` was given. Each
temporary is named ``.TARGET.XXXX[.KIND].capsid-tmp`` and holds an ``flock`` for as
long as its writer lives, so what a killed run (``kill -9``) left behind is
recognised and removed by the next run that writes into the same directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from capsid import log
from capsid.errors import CapsidError, OutputExistsError, ToolError

LOG = log.get(__name__)

SUFFIX = ".capsid-tmp"
#: A temporary this young is left alone even when unlocked: its writer may be about to lock it.
_GRACE_SECONDS = 2
#: Less free space than this (or than an eighth of a small file system) after a failed
#: write means the file system is full.
_FULL_BYTES = 4 << 20


def copy_range(fin: int, fout: int, length: int, src_pos: int, dst_pos: int) -> None:
    """Copy *length* bytes of fd *fin* at *src_pos* to fd *fout* at *dst_pos*: in the
    kernel (a reflink where the file system has them), through memory where it cannot.
    Raises EOFError if *fin* ends first."""
    while length:
        try:
            n = os.copy_file_range(fin, fout, length, src_pos, dst_pos)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = -1
        if n < 0:
            chunk = os.pread(fin, min(length, 1 << 20), src_pos)
            n = os.pwrite(fout, chunk, dst_pos) if chunk else 0
        if n == 0:
            raise EOFError(f"the source ended {length} bytes short")
        src_pos, dst_pos, length = src_pos + n, dst_pos + n, length - n


def copy_file(source: Path, target: Path) -> None:
    """Copy file *source* to *target* (created or truncated) with :func:`copy_range`: a
    reflink or a copy on the server where the file system can (XFS, Btrfs, NFS 4.2)."""
    with open(source, "rb") as fin, open(target, "wb") as fout:
        copy_range(fin.fileno(), fout.fileno(), os.fstat(fin.fileno()).st_size, 0, 0)


def place(source: Path, target: Path, force: bool = False, share: bool = False) -> None:
    """Give *target* the bytes of file *source*, atomically.

    With *share*, *target* becomes a second name of *source* (no copy, no second
    copy's disk space) where that is safe: *source* has no other name, no one else may
    write it, and it has the mode a copy would get. Otherwise, or where the file system
    refuses (another file system, no hard links), it is a copy.
    """
    check_target(target, force)
    if share and _shareable(source, target):
        name = target.parent / f".{target.name}.{os.getpid()}-{next(_NUMBERS)}.link{SUFFIX}"
        _LIVE.add(name)  # a killed run leaves an unlocked name, which clean_stale removes
        try:
            os.link(source, name)
            os.replace(name, target)
            return
        except OSError as err:
            LOG.debug("copying %s: %s", source, err)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)  # still there if the link or the rename failed
            _LIVE.discard(name)
    with atomic_file(target, force) as tmp:
        copy_file(source, tmp)


def _shareable(source: Path, target: Path) -> bool:
    try:
        st = os.stat(source)
    except OSError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    return (st.st_nlink == 1 and mode == 0o777 & ~_umask() and not mode & 0o022
            and not (os.path.isdir(target) and not os.path.islink(target)))


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


def remove(path: Path) -> None:
    """Remove a file or a whole tree, read-only directories included; never follow links."""
    if not (path.is_dir() and not path.is_symlink()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return

    def writable_parent(_func: object, failed: str, _exc: object) -> None:
        # A sandbox may hold read-only directories: open the parent up, then retry once.
        with contextlib.suppress(OSError):
            parent = os.path.dirname(failed)
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                remove(Path(failed))
            else:
                os.unlink(failed)

    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path, onerror=writable_parent)


#: temporaries of this process not yet removed or renamed: named before they are made,
#: so that an interrupt at any moment can remove them (:func:`discard_live`)
_LIVE: set[Path] = set()
_NUMBERS = itertools.count()


class Temporary:
    """A file or directory beside a target, locked while this process may still use it."""

    def __init__(self, beside: Path, kind: str = "", directory: bool = False) -> None:
        clean_stale(beside.parent)
        suffix = (f".{kind}" if kind else "") + SUFFIX
        self._fd = -1
        while True:
            self.path = beside.parent / f".{beside.name}.{os.getpid()}-{next(_NUMBERS)}{suffix}"
            _LIVE.add(self.path)
            try:
                if directory:
                    os.mkdir(self.path, 0o700)
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                else:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                       | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # an earlier process of this pid left it
                _LIVE.discard(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def discard(self) -> None:
        """Remove it (if still there) and drop the lock."""
        remove(self.path)
        self.release()

    def release(self) -> None:
        """Drop the lock (it was renamed into place, or removed)."""
        _LIVE.discard(self.path)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def discard_live() -> None:
    """Remove this process's temporaries: after an interrupt, wherever it came."""
    for path in list(_LIVE):
        with contextlib.suppress(OSError):
            remove(path)
        _LIVE.discard(path)


def clean_stale(directory: Path) -> None:
    """Remove the temporaries in *directory* whose writers are gone (their lock is free)."""
    try:
        entries = [e for e in os.scandir(directory)
                   if e.name.startswith(".") and e.name.endswith(SUFFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < _GRACE_SECONDS:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its writer is alive
        else:
            LOG.info("removing %s, left by an interrupted run", entry.path)
            with contextlib.suppress(OSError):
                remove(Path(entry.path))
        finally:
            os.close(fd)


@contextlib.contextmanager
def scratch(beside: Path, kind: str) -> Iterator[Path]:
    """A locked scratch file beside *beside*, removed afterwards whatever happens."""
    temp = Temporary(beside, kind)
    try:
        with _explained(beside):  # here, while what filled the disk is still there
            yield temp.path
    finally:
        temp.discard()


@contextlib.contextmanager
def _explained(target: Path) -> Iterator[None]:
    """Say that the disk is full when that is why a write failed (tools hide it)."""
    try:
        yield
    except (OSError, ToolError) as err:
        if isinstance(err, OSError) and err.errno == errno.EDQUOT:
            raise CapsidError(f"your disk quota on the file system of {target.parent} is "
                              "exhausted", "free some space or write the output elsewhere"
                              ) from None
        try:
            fs = os.statvfs(target.parent)
        except OSError:
            raise err from None
        free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize
        nearly_empty = min(_FULL_BYTES, fs.f_blocks * fs.f_frsize // 8)
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < nearly_empty:
            raise CapsidError(f"the file system of {target.parent} is full "
                              f"({free >> 20} MiB free) while writing {target.name}",
                              "free some space or write the output elsewhere") from None
        raise


@contextlib.contextmanager
def atomic_file(target: Path, force: bool = False, mode: int = 0o777) -> Iterator[Path]:
    """Yield a temporary path beside *target*; on success fsync it and rename it over.

    The file gets *mode* less the umask: by default executable, as Apptainer writes
    SIFs, whose ``#!/usr/bin/env run-singularity`` line then runs them.
    """
    check_target(target, force)
    temp = Temporary(target)
    try:
        with _explained(target):
            yield temp.path
            with open(temp.path, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(temp.path, mode & ~_umask())
        if target.is_dir() and not target.is_symlink():
            remove(target)
        os.replace(temp.path, target)
        temp.release()
    except BaseException:
        temp.discard()
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory path (not yet created) beside *target*; rename on success."""
    check_target(target, force)
    holder = Temporary(target, directory=True)
    path = holder.path / "rootfs"
    try:
        with _explained(target):
            yield path
        if os.path.lexists(target):
            os.rename(target, holder.path / "old")
        os.rename(path, target)
    finally:
        holder.discard()


def write_bytes(target: Path, data: bytes, mode: int | None = None) -> None:
    """Write small *data* to *target* atomically and durably (a cache entry, credentials)."""
    temp = Temporary(target)
    try:
        with open(temp.path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(temp.path, mode)
        os.replace(temp.path, target)
        temp.release()
    except BaseException:
        temp.discard()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
