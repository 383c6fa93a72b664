"""Copying files into an image root without ever leaving it (COPY, ADD, %files).

Destinations are resolved with :mod:`capsid.inroot`, so a symlink in the image
(``/bin -> usr/bin``, or a hostile ``/data -> /home/you``) is followed inside the image
only; every file is then created relative to a directory descriptor with
``O_NOFOLLOW``. Sources are read from the host (the build context) or from another
stage's root, resolved the same way there.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Callable

from capsid import inroot
from capsid.errors import CapsidError

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


class Destination:
    """An image root open for writing: directories made, files copied, all inside it."""

    def __init__(self, root: str, mtime: int | None = None,
                 skip: Callable[[str], bool] | None = None,
                 owner: tuple[int, int] | None = None) -> None:
        self.root_fd = os.open(root, _DIR)
        self.mtime = mtime  #: timestamp for everything written (reproducible builds)
        self.skip = skip  #: source paths to leave out (.dockerignore)
        self.owner = owner  #: (uid, gid) of what is copied (COPY --chown); else root's

    def close(self) -> None:
        os.close(self.root_fd)

    def directory(self, path: str, mode: int = 0o755) -> int:
        """An fd (O_PATH) of directory *path* inside the root, made with its parents."""
        with inroot.walk(self.root_fd, path) as found:
            if found.trail and not stat.S_ISDIR(os.fstat(found.fd).st_mode):
                raise CapsidError(f"{path} in the image is not a directory",
                                  "copy to another destination")
            for part in found.missing:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=found.fd)
                found.fds.append(os.open(part, _DIR, dir_fd=found.fd))
                found.trail.append(part)
            return os.dup(found.fd)

    def is_dir(self, path: str) -> bool:
        try:
            with inroot.walk(self.root_fd, path) as found:
                return not found.missing and stat.S_ISDIR(os.fstat(found.fd).st_mode)
        except inroot.Unresolvable:
            return False

    def copy(self, source: str, dest: str, *, chmod: int | None = None,
             follow_top: bool = True) -> None:
        """Copy host path *source* (a file, link or tree) to exactly *dest* in the root."""
        parent, name = os.path.split(dest.rstrip("/") or "/")
        if not name:
            self.copy_contents(source, "/", chmod=chmod)
            return
        parent_fd = self.directory(parent or "/")
        try:
            self._entry(source, parent_fd, name, chmod, follow_top)
        finally:
            os.close(parent_fd)

    def copy_contents(self, source: str, dest: str, *, chmod: int | None = None) -> None:
        """Copy what directory *source* holds into directory *dest* (Docker's COPY dir/)."""
        dest_fd = self.directory(dest)
        try:
            for entry in sorted(os.listdir(source)):
                self._entry(os.path.join(source, entry), dest_fd, entry, chmod, False)
        finally:
            os.close(dest_fd)

    def _entry(self, source: str, parent_fd: int, name: str, chmod: int | None,
               follow: bool) -> None:
        if self.skip is not None and self.skip(source):
            return
        info = os.stat(source) if follow else os.lstat(source)
        if stat.S_ISDIR(info.st_mode):
            try:
                existing = os.lstat(name, dir_fd=parent_fd)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISLNK(existing.st_mode):
                # Into a linked directory: follow the link, inside the root only.
                self.copy_contents(source, self._path_of(parent_fd, name), chmod=chmod)
                return
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            elif not stat.S_ISDIR(existing.st_mode):
                os.unlink(name, dir_fd=parent_fd)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)
            try:
                for entry in sorted(os.listdir(source)):
                    self._entry(os.path.join(source, entry), fd, entry, chmod, False)
                if self.owner is not None:
                    os.chown(fd, *self.owner)
                os.chmod(fd, chmod if chmod is not None else stat.S_IMODE(info.st_mode))
                self._stamp(fd, info)
            finally:
                os.close(fd)
            return
        self._remove_nondir(parent_fd, name)
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(source), name, dir_fd=parent_fd)
            if self.owner is not None:
                os.chown(name, *self.owner, dir_fd=parent_fd, follow_symlinks=False)
            when = self.mtime if self.mtime is not None else info.st_mtime
            os.utime(name, (when, when), dir_fd=parent_fd, follow_symlinks=False)
            return
        if not stat.S_ISREG(info.st_mode):
            return  # sockets, FIFOs and devices are not copied, as Docker does not
        with open(source, "rb") as src:
            self.write(src, parent_fd, name, chmod if chmod is not None
                       else stat.S_IMODE(info.st_mode), info)

    def write(self, src: object, parent_fd: int, name: str, mode: int,
              info: os.stat_result | None = None) -> None:
        """A regular file *name* in *parent_fd* with the content of file object *src*."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent_fd)
        try:
            while chunk := src.read(_CHUNK):  # type: ignore[attr-defined]
                os.write(fd, chunk)
            if self.owner is not None:
                os.chown(fd, *self.owner)  # before chmod: chown clears set-id bits
            os.chmod(fd, mode)
            self._stamp(fd, info)
        finally:
            os.close(fd)

    def _stamp(self, fd: int, info: os.stat_result | None) -> None:
        if self.mtime is not None:
            os.utime(fd, (self.mtime, self.mtime))
        elif info is not None:
            os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))

    @staticmethod
    def _remove_nondir(parent_fd: int, name: str) -> None:
        try:
            existing = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(existing.st_mode):
            raise CapsidError(f"cannot copy a file over the directory {name} in the image",
                              "copy it to another destination")
        os.unlink(name, dir_fd=parent_fd)

    def _path_of(self, parent_fd: int, name: str) -> str:
        """The in-root path of *name* in *parent_fd*, through the link it is."""
        here = os.readlink(f"/proc/self/fd/{parent_fd}")
        root = os.readlink(f"/proc/self/fd/{self.root_fd}")
        inside = here[len(root):] if here.startswith(root) else "/"
        target = os.readlink(name, dir_fd=parent_fd)
        return target if target.startswith("/") else f"{inside}/{target}"

    def extract(self, archive: str, dest: str) -> None:
        """Unpack local tar archive *archive* (any compression) into directory *dest*."""
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    try:
                        self._member(tar, member, dest)
                    except FileNotFoundError:
                        if not member.islnk():
                            raise
                        raise CapsidError(
                            f"cannot unpack {os.path.basename(archive)}: {member.name} is a "
                            f"hard link to {member.linkname}, which the archive does not "
                            "hold before it", "fix the archive (tar it again)") from None
        except tarfile.TarError as err:
            raise CapsidError(f"cannot unpack {os.path.basename(archive)}: {err}",
                              "ADD unpacks tar archives; COPY copies files as they are"
                              ) from None

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, dest: str) -> None:
        parts = [p for p in member.name.split("/") if p and p != "."]
        if not parts or ".." in parts:
            return
        parent_fd = self.directory(os.path.join(dest, *parts[:-1]))
        name = parts[-1]
        try:
            mode = member.mode & 0o7777
            if member.isdir():
                if not os.path.lexists(f"/proc/self/fd/{parent_fd}/{name}"):
                    os.mkdir(name, 0o755, dir_fd=parent_fd)
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=parent_fd)
                os.chmod(fd, mode)
                os.close(fd)
            elif member.issym():
                self._remove_nondir(parent_fd, name)
                os.symlink(member.linkname, name, dir_fd=parent_fd)
            elif member.isreg():
                self._remove_nondir(parent_fd, name)
                src = tar.extractfile(member)
                assert src is not None
                self.write(src, parent_fd, name, mode)
            elif member.islnk():
                target = self.directory(os.path.join(dest, os.path.dirname(member.linkname)))
                self._remove_nondir(parent_fd, name)
                try:
                    os.link(os.path.basename(member.linkname), name, src_dir_fd=target,
                            dst_dir_fd=parent_fd, follow_symlinks=False)
                finally:
                    os.close(target)
        finally:
            os.close(parent_fd)
