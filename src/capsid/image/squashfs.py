"""Squashfs images: made from a tar stream with tar2sqfs, read with unsquashfs.

Nothing is unpacked on the host to make an image: callers write tar members
into :func:`create` and ``tar2sqfs`` (squashfs-tools-ng) builds the filesystem
from its stdin, so ownership, modes, device nodes and xattrs survive without
privileges. Reading uses ``unsquashfs -o OFFSET`` so that a partition inside a
SIF is read in place, without copying it out or mounting it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from capsid import log, tools
from capsid.errors import ImageFormatError, UsageError

LOG = log.get(__name__)

MAGIC = b"hsqs"
COMPRESSIONS = ("zstd", "gzip", "xz", "lz4")
#: tar2sqfs's own zstd default (level 15) is several times slower for a few per
#: cent of size. Level 2 makes a pull's squashfs 2 % larger than level 3 and takes
#: a fifth less CPU, which a pull on few cores waits for (README, Benchmarks).
_COMPRESSOR_OPTIONS = {"zstd": "level=2", "gzip": "level=9"}


def check_compression(name: str) -> str:
    if name not in COMPRESSIONS:
        raise UsageError(f"unknown compression {name!r}",
                         f"choose one of {', '.join(COMPRESSIONS)}")
    return name


@contextlib.contextmanager
def writer(out: Path, compression: str = "zstd",
           zstd_level: int | None = None) -> Iterator[BinaryIO]:
    """Yield a pipe; the tar stream written to it becomes squashfs *out* (with zstd at
    *zstd_level*, if given, instead of capsid's).

    The stream goes straight into ``tar2sqfs``. If the block raises, tar2sqfs
    is killed and *out* is removed.
    """
    check_compression(compression)
    argv = [tools.which("tar2sqfs"), "--quiet", "--force", "--no-skip",
            "--compressor", compression, "--num-jobs", str(os.cpu_count() or 1)]
    if compression == "zstd" and zstd_level is not None:
        argv += ["--comp-extra", f"level={zstd_level}"]
    elif compression in _COMPRESSOR_OPTIONS:
        argv += ["--comp-extra", _COMPRESSOR_OPTIONS[compression]]
    argv.append(str(out))
    LOG.debug("running %s", " ".join(argv))
    with tempfile.TemporaryFile() as errors:
        proc = tools.start(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           stderr=errors, bufsize=1 << 20)
        assert proc.stdin is not None
        tools.widen_pipe(proc.stdin.fileno())
        try:
            yield proc.stdin  # type: ignore[misc]
            proc.stdin.close()
        except BrokenPipeError:
            proc.wait()
            errors.seek(0)
            out.unlink(missing_ok=True)
            raise tools.failure("tar2sqfs", proc.returncode, errors.read()) from None
        except BaseException:
            proc.kill()
            proc.wait()
            out.unlink(missing_ok=True)
            raise
        if proc.wait() != 0:
            errors.seek(0)
            out.unlink(missing_ok=True)
            raise tools.failure("tar2sqfs", proc.returncode, errors.read())


def check_magic(path: Path, offset: int = 0) -> None:
    """Raise ImageFormatError unless a squashfs superblock starts at *offset*."""
    with open(path, "rb") as f:
        f.seek(offset)
        if f.read(4) != MAGIC:
            raise ImageFormatError(f"{path} has no squashfs filesystem at offset {offset}",
                                   "the image is damaged; rebuild it")


def _unsquashfs(image: Path, offset: int, dest: Path, paths: list[str],
                tolerate_partial: bool) -> None:
    argv = ["unsquashfs", "-o", str(offset), "-n", "-q", "-f", "-d", str(dest)]
    if os.geteuid() != 0:
        argv.append("-user-xattrs")
    argv += [str(image), *paths]
    exe = tools.which("unsquashfs")
    proc = subprocess.run([exe, *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    if proc.returncode == 2 and tolerate_partial:
        # Non-fatal: typically device nodes an ordinary user may not create, which a
        # container gets from the host at run time anyway: one line, when asked
        lines = proc.stderr.decode(errors="replace").splitlines()
        devices = [line.split(dest.name + "/", 1)[-1].split(",", 1)[0] for line in lines
                   if "could not create" in line and "device" in line]
        if devices:
            LOG.info("left out %d device nodes (%s): only root makes them, and a "
                     "container gets the host's", len(devices), ", ".join(devices[:4])
                     + (", …" if len(devices) > 4 else ""))
        for line in [line for line in lines if not ("could not create" in line
                                                     and "device" in line)][:5]:
            LOG.warning("unsquashfs: %s", line)
        return
    if proc.returncode != 0:
        raise tools.failure("unsquashfs", proc.returncode, proc.stderr)


def extract(image: Path, dest: Path, offset: int = 0) -> None:
    """Unpack the whole filesystem into *dest* (which must not exist yet)."""
    check_magic(image, offset)
    _unsquashfs(image, offset, dest, [], tolerate_partial=True)


def read_tree(image: Path, subdir: str, offset: int = 0) -> dict[str, bytes | str]:
    """Files under *subdir* as {relative path: contents, or link target for symlinks}.

    Returns an empty dict when *subdir* is absent from the image.
    """
    check_magic(image, offset)
    with tempfile.TemporaryDirectory(prefix="capsid-read-") as tmp:
        dest = Path(tmp) / "root"
        _unsquashfs(image, offset, dest, [subdir], tolerate_partial=True)
        base = dest / subdir.lstrip("/")
        return read_dir(base)


def read_dir(base: Path) -> dict[str, bytes | str]:
    """Regular files and symlinks below *base*, keyed by path relative to it."""
    found: dict[str, bytes | str] = {}
    if not base.is_dir():
        return found
    for root, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if (Path(root) / d).is_symlink()]:
            path = Path(root) / name
            rel = str(path.relative_to(base))
            if path.is_symlink():
                found[rel] = os.readlink(path)
            elif path.is_file():
                with contextlib.suppress(OSError):
                    found[rel] = path.read_bytes()
    return found
