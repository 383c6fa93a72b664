"""The SIF reader and writer against the format's fixed layout and hostile input."""

from __future__ import annotations

import io
import struct
import uuid
from pathlib import Path

import pytest

from capsid.errors import ImageFormatError, ImageNotFoundError
from capsid.image import sif


def _write(tmp_path: Path, name: str = "x.sif", **kw: object) -> Path:
    part = tmp_path / "part.bin"
    part.write_bytes(b"hsqs" + b"\1" * 5000)
    objects = [
        sif.NewObject(sif.DataType.DEFFILE, b"Bootstrap: scratch\n"),
        sif.NewObject(sif.DataType.GENERIC_JSON, b"{}", "inspect-metadata.json"),
        sif.NewObject.partition(part, "amd64"),
    ]
    out = tmp_path / name
    with open(out, "wb") as f:
        sif.write(f, objects, created_at=1_700_000_000, **kw)  # type: ignore[arg-type]
    return out


def test_struct_sizes_match_the_spec() -> None:
    assert sif.HEADER.size == 128
    assert sif.DESCRIPTOR.size == 585


def test_written_image_reads_back_with_apptainer_layout(tmp_path: Path) -> None:
    path = _write(tmp_path)
    with sif.SifImage(path) as image:
        h = image.header
        assert h.launch_script == sif.LAUNCH_SCRIPT
        assert (h.version, h.arch) == ("01", "amd64")
        assert (h.descriptors_total, h.descriptors_free) == (48, 45)
        assert (h.descriptors_offset, h.descriptors_size, h.data_offset) == (4096, 28080, 32176)
        deffile, meta, part = image.descriptors
        assert [d.id for d in image.descriptors] == [1, 2, 3]
        assert deffile.offset == 32176 and image.read(deffile) == b"Bootstrap: scratch\n"
        assert meta.name == "inspect-metadata.json" and meta.offset == 32176 + 19
        assert part.offset % 4096 == 0
        assert part.size_with_padding == part.size + (part.offset - (meta.offset + meta.size))
        assert part.partition() == (sif.FsType.SQUASHFS, sif.PartType.PRIMARY_SYSTEM, "amd64")
        assert image.primary_partition() == part
        assert all(d.raw_group_id == 0xF0000001 and d.group == 1 for d in image.descriptors)
        assert h.data_size == part.offset + part.size - h.data_offset


def test_raw_bytes_of_header_fields(tmp_path: Path) -> None:
    raw = _write(tmp_path).read_bytes()
    assert raw[:32] == b"#!/usr/bin/env run-singularity\n\0"
    assert raw[32:42] == b"SIF_MAGIC\0" and raw[42:45] == b"01\0" and raw[45:48] == b"02\0"
    assert struct.unpack_from("<q", raw, 96)[0] == 4096
    first = raw[4096:4096 + 585]
    assert struct.unpack_from("<iBI", first) == (0x4001, 1, 1)


def test_same_inputs_give_identical_bytes(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.sif").read_bytes()
    b = _write(tmp_path, "b.sif").read_bytes()
    assert a == b
    assert uuid.UUID(bytes=a[48:64]).int != 0


def test_explicit_id_is_kept(tmp_path: Path) -> None:
    wanted = uuid.UUID("3fa802cc-358b-45e3-bcc0-69dc7a45f9f8")
    with sif.SifImage(_write(tmp_path, image_id=wanted)) as image:
        assert image.header.id == wanted


def test_group_links_decode() -> None:
    d = sif.Descriptor(0x4005, True, 3, 0xF0000000, 0xF0000001, 0, 0, 0, 0, 0, 0, 0, "", b"")
    assert d.group == 0 and d.link == (1, True)
    d = sif.Descriptor(0x4005, True, 3, 0xF0000001, 2, 0, 0, 0, 0, 0, 0, 0, "", b"")
    assert d.group == 1 and d.link == (2, False)


@pytest.mark.parametrize("cut", [0, 50, 127, 4096 + 585 * 10])
def test_truncated_file_is_rejected(tmp_path: Path, cut: int) -> None:
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ImageFormatError, match=r"truncated|shorter than a SIF header"):
        sif.SifImage(path)


def test_object_past_end_of_file_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(ImageFormatError, match="beyond the end of the file"):
        sif.SifImage(path)


def test_descriptor_offset_pointing_past_end_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<q", raw, 4096 + 17, len(raw) + 4096)  # object 1's offset
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageFormatError, match="object 1 lies beyond"):
        sif.SifImage(path)


def test_wrong_magic_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[32:41] = b"NOT_MAGIC"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageFormatError, match="magic"):
        sif.SifImage(path)


def test_unknown_version_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[42:44] = b"02"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageFormatError, match="version '02'"):
        sif.SifImage(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError):
        sif.SifImage(tmp_path / "absent.sif")
    with pytest.raises(ImageFormatError, match="directory"):
        sif.SifImage(tmp_path)


def test_is_sif(tmp_path: Path) -> None:
    assert sif.is_sif(_write(tmp_path))
    (tmp_path / "t").write_bytes(b"hello")
    assert not sif.is_sif(tmp_path / "t")


def test_copy_to_streams_the_object(tmp_path: Path) -> None:
    with sif.SifImage(_write(tmp_path)) as image:
        buf = io.BytesIO()
        image.copy_to(image.descriptors[2], buf, chunk=1000)
        assert buf.getvalue() == b"hsqs" + b"\1" * 5000


def _supports_insert_range(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"\0" * 8192)
    with open(probe, "r+b") as f:
        ok = sif._insert_range(f.fileno(), 4096)
    probe.unlink()
    return ok


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_write_in_place_gives_the_same_bytes(tmp_path: Path, where: str) -> None:
    """The squashfs file turned into the SIF in place equals a SIF written afresh; where
    the file system cannot insert (tmpfs), nothing changes and False says so."""
    import tempfile

    wanted = uuid.UUID("3fa802cc-358b-45e3-bcc0-69dc7a45f9f8")
    expected = _write(tmp_path, image_id=wanted).read_bytes()
    base = tmp_path if where == "tmp" else Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir=base) as directory:
        part = Path(directory) / "part.bin"
        content = b"hsqs" + b"\1" * 5000
        part.write_bytes(content)
        objects = [
            sif.NewObject(sif.DataType.DEFFILE, b"Bootstrap: scratch\n"),
            sif.NewObject(sif.DataType.GENERIC_JSON, b"{}", "inspect-metadata.json"),
            sif.NewObject.partition(part, "amd64"),
        ]
        supported = _supports_insert_range(Path(directory))
        done = sif.write_in_place(part, objects, created_at=1_700_000_000, image_id=wanted)
        assert done == supported
        assert part.read_bytes() == (expected if done else content)
    if where == "tmp" and not supported:
        pytest.skip("this file system cannot insert ranges; the fallback was checked")
