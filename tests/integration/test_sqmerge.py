"""A squashfs laid over another (capsid.image.sqmerge) is the image written whole.

Each case streams a lower and an upper layer through the flattener: both together into
``tar2sqfs`` (the whole image), and each alone (the lower image, and the upper one with
its cover). The merged image must equal the whole one in every file's contents, type,
owner, permissions and timestamps (squashfs-tools-ng's ``sqfsdiff``), be read by
``unsquashfs`` without a complaint and, as root, mount with the kernel's squashfs.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from capsid.image import squashfs
from capsid.image.flatten import Cover, Flattener
from capsid.image.sqmerge import Unmergeable, merge

pytestmark = pytest.mark.skipif(not (shutil.which("tar2sqfs") and shutil.which("sqfsdiff")),
                                reason="needs tar2sqfs and sqfsdiff (squashfs-tools-ng)")

Entry = tuple[tarfile.TarInfo, bytes]


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
          uid: int = 0, mtime: int = 1_600_000_000, link: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, uid, mtime
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def squash(out: Path, layers: list[bytes]) -> Cover:
    """*layers* (newest first) flattened into squashfs *out*; their cover."""
    with squashfs.writer(out) as pipe:
        flat = Flattener(pipe.write)
        for layer in layers:
            flat.add_layer([layer])
        flat.finish()
    return flat.cover()


def merged(tmp: Path, lower: list[Entry], upper: list[Entry]) -> tuple[Path, Path]:
    """(the whole image, the merged one) of *upper* over *lower*."""
    low, up = tar(lower), tar(upper)
    squash(tmp / "whole.sqfs", [up, low])
    squash(tmp / "lower.sqfs", [low])
    cover = squash(tmp / "upper.sqfs", [up])
    with open(tmp / "lower.sqfs", "rb") as lf, open(tmp / "upper.sqfs", "rb") as uf, \
            open(tmp / "merged.sqfs", "w+b") as out:
        merge(lf, 0, uf, out, cover)
    return tmp / "whole.sqfs", tmp / "merged.sqfs"


def same(whole: Path, result: Path) -> None:
    diff = subprocess.run(["sqfsdiff", "-T", "-a", str(whole), "-b", str(result)],
                          capture_output=True, text=True, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    listing = subprocess.run(["unsquashfs", "-lls", "-n", str(result)], capture_output=True,
                             text=True, check=False)
    assert listing.returncode == 0 and not listing.stderr, listing.stderr


def base_tree(rng: random.Random) -> list[Entry]:
    out = [entry("etc", tarfile.DIRTYPE, mode=0o755), entry("usr", tarfile.DIRTYPE, mode=0o755),
           entry("usr/lib", tarfile.DIRTYPE, mode=0o755, mtime=1_500_000_000),
           entry("srv", tarfile.DIRTYPE, mode=0o750, uid=33),
           entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
           entry("etc/big", data=rng.randbytes(300_000)),
           entry("etc/link", tarfile.SYMTYPE, link="passwd"),
           entry("etc/group", data=b"root:x:0:\n"),
           entry("etc/hard", tarfile.LNKTYPE, link="etc/group"),
           entry("dev", tarfile.DIRTYPE, mode=0o755),
           entry("dev/null", tarfile.CHRTYPE, mode=0o666),
           entry("usr/lib/keep", tarfile.DIRTYPE, mode=0o700)]
    for i in range(600):  # a directory larger than a metadata block, many inodes
        out.append(entry(f"usr/lib/file{i:04}", data=f"lib {i}\n".encode() * (i % 7),
                         uid=i % 5))
    return out


CASES: dict[str, Callable[[random.Random], list[Entry]]] = {
    "add a file in a new directory": lambda rng: [
        entry("src", tarfile.DIRTYPE, mode=0o755), entry("src/fib.py", data=b"print(1)\n")],
    "replace a file, keep the directory's attributes": lambda rng: [
        entry("etc/passwd", data=b"changed\n", mode=0o600, uid=7)],
    "a directory entry of its own wins": lambda rng: [
        entry("usr/lib", tarfile.DIRTYPE, mode=0o700, uid=9, mtime=1_700_000_000),
        entry("usr/lib/new", data=b"n")],
    "whiteouts": lambda rng: [
        entry("etc/.wh.big"), entry("usr/lib/.wh.file0003"), entry(".wh.srv")],
    "an opaque directory": lambda rng: [
        entry("usr/lib", tarfile.DIRTYPE, mode=0o755),
        entry("usr/lib/.wh..wh..opq"), entry("usr/lib/only", data=b"o")],
    "a file over a directory, a directory over a file": lambda rng: [
        entry("usr/lib/keep", data=b"now a file"),
        entry("etc/passwd", tarfile.DIRTYPE, mode=0o755),
        entry("etc/passwd/inside", data=b"i")],
    "hard links, symlinks, devices, large and empty files": lambda rng: [
        entry("opt", tarfile.DIRTYPE, mode=0o755),
        entry("opt/a", data=rng.randbytes(1_000_000)), entry("opt/b", tarfile.LNKTYPE,
                                                             link="opt/a"),
        entry("opt/empty"), entry("opt/s", tarfile.SYMTYPE, link="/etc/passwd"),
        entry("opt/fifo", tarfile.FIFOTYPE), entry("opt/null", tarfile.CHRTYPE),
        entry("etc/new-owner", data=b"x", uid=123_456)],
    "many new files beside many old ones": lambda rng: [
        entry(f"usr/lib/file{i:04}x", data=rng.randbytes(rng.randrange(0, 9000)))
        for i in range(0, 600, 3)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_image_equals_the_whole_one(tmp_path: Path, case: str) -> None:
    rng = random.Random(case)
    whole, result = merged(tmp_path, base_tree(rng), CASES[case](rng))
    same(whole, result)


def test_merging_twice(tmp_path: Path) -> None:
    """A merged image is a valid lower image for the next merge (rebuild on rebuild)."""
    rng = random.Random(2)
    lower = base_tree(rng)
    first = [entry("src", tarfile.DIRTYPE, mode=0o755), entry("src/a", data=b"a")]
    second = [entry("src/b", data=b"b"), entry("etc/.wh.passwd")]
    _whole1, result1 = merged(tmp_path, lower, first)
    cover = squash(tmp_path / "up2.sqfs", [tar(second)])
    squash(tmp_path / "whole2.sqfs", [tar(second), tar(first), tar(lower)])
    with open(result1, "rb") as lf, open(tmp_path / "up2.sqfs", "rb") as uf, \
            open(tmp_path / "merged2.sqfs", "w+b") as out:
        merge(lf, 0, uf, out, cover)
    same(tmp_path / "whole2.sqfs", tmp_path / "merged2.sqfs")


def test_the_lower_images_extended_attributes_are_kept(tmp_path: Path) -> None:
    """A Debian base has a few (ping's capability); new layers without any merge over it."""
    rng = random.Random(6)
    lower = base_tree(rng)
    ping, data = entry("usr/bin-ping", data=b"\x7fELF", mode=0o755)
    ping.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02 \x00\x00"
                        "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}
    lower.append((ping, data))
    whole, result = merged(tmp_path, lower, CASES["add a file in a new directory"](rng))
    same(whole, result)
    listed = subprocess.run(["rdsquashfs", "-x", "/usr/bin-ping", str(result)],
                            capture_output=True, text=True, check=True).stdout
    assert "security.capability" in listed


def test_a_hard_link_to_a_lower_file_cannot_be_merged(tmp_path: Path) -> None:
    with pytest.raises(Unmergeable):
        merged(tmp_path, base_tree(random.Random(3)),
               [entry("etc/again", tarfile.LNKTYPE, link="etc/passwd")])


@pytest.mark.parametrize("damage", ["truncated", "garbled tables", "not squashfs"])
def test_a_damaged_lower_image_is_refused_not_crashed_on(tmp_path: Path, damage: str) -> None:
    """Whatever the lower file holds, merging raises Unmergeable (the caller then writes
    the whole image), never another exception."""
    rng = random.Random(damage)
    merged(tmp_path, base_tree(rng), CASES["whiteouts"](rng))
    data = bytearray((tmp_path / "lower.sqfs").read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "garbled tables":
        start = int.from_bytes(data[64:72], "little")  # the inode table
        for i in range(start, len(data), 7):
            data[i] = rng.randrange(256)
    else:
        data[0] ^= 0xFF
    (tmp_path / "lower.sqfs").write_bytes(bytes(data))
    cover = squash(tmp_path / "upper.sqfs", [tar(CASES["whiteouts"](rng))])
    with open(tmp_path / "lower.sqfs", "rb") as lf, open(tmp_path / "upper.sqfs", "rb") as uf, \
            open(tmp_path / "merged.sqfs", "w+b") as out, pytest.raises(Unmergeable):
        merge(lf, 0, uf, out, cover)


def test_a_lower_hard_link_keeps_its_inode(tmp_path: Path) -> None:
    """Replacing one name of a lower hard-linked file leaves the other name the old
    file, as overlayfs (and so Docker) does."""
    _whole, result = merged(tmp_path, base_tree(random.Random(5)),
                            [entry("etc/group", data=b"new\n")])

    def cat(path: str) -> bytes:
        return subprocess.run(["rdsquashfs", "-c", path, str(result)], capture_output=True,
                              check=True).stdout
    assert cat("/etc/group") == b"new\n"
    assert cat("/etc/hard") == b"root:x:0:\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting the kernel's squashfs needs root")
def test_the_kernel_mounts_a_merged_image(tmp_path: Path) -> None:
    rng = random.Random(4)
    _whole, result = merged(tmp_path, base_tree(rng), CASES["many new files beside many old "
                                                           "ones"](rng))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(result), str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"no loop mount here: {done.stderr.strip()}")
    try:
        names = set(os.listdir(mnt / "usr" / "lib"))
        assert {"file0000", "file0003x", "keep"} <= names and len(names) == 801
        assert (mnt / "etc" / "passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
        for name in sorted(names)[:50]:
            if not name.startswith("keep"):
                (mnt / "usr" / "lib" / name).read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("level", [1, 3, 15])
def test_an_upper_image_is_compressed_as_its_lower_one_so_they_merge(tmp_path: Path,
                                                                     level: int) -> None:
    """A base pulled by a capsid that compressed at another zstd level still merges: the
    upper image takes the lower one's level (read from its compressor options)."""
    from capsid.image.sqmerge import zstd_level

    low = tar(base_tree(random.Random(1)))
    up = tar([entry("new", tarfile.DIRTYPE, mode=0o755), entry("new/file", data=b"added")])
    subprocess.run(["tar2sqfs", "--quiet", "--force", "--compressor", "zstd", "--comp-extra",
                    f"level={level}", str(tmp_path / "lower.sqfs")], input=low, check=True)
    with open(tmp_path / "lower.sqfs", "rb") as lf:
        assert zstd_level(lf) == level

    def upper(name: str, zstd: int | None) -> Cover:
        with squashfs.writer(tmp_path / name, zstd_level=zstd) as pipe:
            flat = Flattener(pipe.write)
            flat.add_layer([up])
            flat.finish()
        return flat.cover()

    cover = upper("mismatched.sqfs", None)  # capsid's own level: no merge but for level 2
    if level != 2:
        with open(tmp_path / "lower.sqfs", "rb") as lf, \
                open(tmp_path / "mismatched.sqfs", "rb") as uf, pytest.raises(Unmergeable):
            merge(lf, 0, uf, io.BytesIO(), cover)
    cover = upper("upper.sqfs", level)
    squash(tmp_path / "whole.sqfs", [up, low])
    with open(tmp_path / "lower.sqfs", "rb") as lf, open(tmp_path / "upper.sqfs", "rb") as uf, \
            open(tmp_path / "merged.sqfs", "w+b") as out:
        merge(lf, 0, uf, out, cover)
    same(tmp_path / "whole.sqfs", tmp_path / "merged.sqfs")


def test_the_level_of_an_image_that_is_not_zstd_is_none(tmp_path: Path) -> None:
    from capsid.image.sqmerge import zstd_level

    subprocess.run(["tar2sqfs", "--quiet", "--force", "--compressor", "gzip",
                    str(tmp_path / "gz.sqfs")], input=tar(base_tree(random.Random(1))),
                   check=True)
    with open(tmp_path / "gz.sqfs", "rb") as f:
        assert zstd_level(f) is None
        assert zstd_level(f, 4096) is None  # no squashfs there
