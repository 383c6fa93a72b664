"""Layers flatten as the OCI image spec says, and hostile layers cannot escape or crash it."""

from __future__ import annotations

import io
import tarfile

import pytest

from capsid.image.flatten import MAX_EXTENSION, Flattener, LayerError


def layer(*entries: tuple[str, str | bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar: (name, content) where bytes = file, str = symlink ('->x') or hard link ('=>x'),
    None = directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE if content.startswith("->") else tarfile.LNKTYPE
                info.linkname = content[2:]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def chunked(data: bytes, size: int = 700) -> list[bytes]:
    """Odd-sized chunks, so headers straddle chunk boundaries."""
    return [data[i:i + size] for i in range(0, len(data), size)]


def flatten(*layers_newest_first: bytes) -> tuple[dict[str, tarfile.TarInfo], dict[str, bytes],
                                                  Flattener]:
    out = io.BytesIO()
    flat = Flattener(out.write)
    for data in layers_newest_first:
        flat.add_layer(chunked(data))
    flat.finish()
    out.seek(0)
    members: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=out, mode="r:") as tar:
        for m in tar:
            assert m.name not in members, f"{m.name} written twice"
            members[m.name] = m
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                contents[m.name] = f.read()
    return members, contents, flat


def test_newer_layers_win_and_whiteouts_hide_older_paths() -> None:
    base = layer(("etc", None), ("etc/a", b"old"), ("etc/b", b"b"), ("var", None),
                 ("var/x", None), ("var/x/y", b"y"), ("keep", b"k"))
    top = layer(("etc/a", b"new"), ("etc/.wh.b", b""), ("var/.wh.x", b""))
    members, contents, _ = flatten(top, base)
    assert contents["etc/a"] == b"new"
    assert "etc/b" not in members and "var/x" not in members and "var/x/y" not in members
    assert contents["keep"] == b"k"
    assert not any(".wh." in name for name in members)


def test_opaque_directory_hides_only_older_contents() -> None:
    base = layer(("d", None), ("d/old", b"o"), ("d/sub", None), ("d/sub/f", b"f"))
    top = layer(("d", None), ("d/.wh..wh..opq", b""), ("d/new", b"n"))
    members, contents, _ = flatten(top, base)
    assert contents["d/new"] == b"n"
    assert "d/old" not in members and "d/sub" not in members and "d/sub/f" not in members
    assert members["d"].isdir()


def test_a_newer_file_hides_an_older_directory_tree() -> None:
    base = layer(("x", None), ("x/inner", b"i"))
    top = layer(("x", b"now a file"))
    members, contents, _ = flatten(top, base)
    assert contents["x"] == b"now a file" and "x/inner" not in members


def test_hard_links_into_older_layers_are_kept_and_dangling_ones_dropped() -> None:
    base = layer(("bin", None), ("bin/tool", b"elf"), ("bin/gone", b"g"))
    top = layer(("bin/alias", "=>bin/tool"), ("bin/dangling", "=>bin/gone"),
                ("bin/.wh.gone", b""))
    members, _, flat = flatten(top, base)
    assert members["bin/alias"].islnk() and members["bin/alias"].linkname == "bin/tool"
    assert "bin/dangling" not in members
    assert any("dangling" in s for s in flat.skipped)


def test_hostile_names_do_not_leave_the_image_root() -> None:
    evil = layer(("../escape", b"x"), ("a/../../up", b"x"), ("/abs/file", b"abs"),
                 ("ok", b"fine"), ("link", "->/etc/shadow"), ("link/through", b"x"),
                 ("hard", "=>../../etc/passwd"))
    members, contents, flat = flatten(evil)
    assert set(members) == {"abs/file", "ok", "link"}
    assert contents["abs/file"] == b"abs"
    assert members["link"].issym()  # a symlink is data inside the image, not followed
    assert len(flat.skipped) == 3  # the two ../ files and the ../ hard link


def test_long_names_and_gnu_headers_pass_through() -> None:
    long = "deep/" * 40 + "file"
    _, contents, _ = flatten(layer((long, b"L"), fmt=tarfile.GNU_FORMAT))
    assert contents[long] == b"L"
    _, contents, _ = flatten(layer((long, b"P"), fmt=tarfile.PAX_FORMAT))
    assert contents[long] == b"P"


def test_huge_extended_headers_are_refused() -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, MAX_EXTENSION + 1
    evil = info.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(LayerError, match="extended tar header"):
        Flattener(io.BytesIO().write).add_layer([evil])


def test_truncated_and_corrupt_layers_are_errors_not_crashes() -> None:
    data = layer(("f", b"x" * 5000))
    with pytest.raises(LayerError, match="ends in the middle"):
        Flattener(io.BytesIO().write).add_layer([data[:1500]])
    bad = bytearray(data)
    bad[0] ^= 0xFF
    with pytest.raises(LayerError, match="checksum"):
        Flattener(io.BytesIO().write).add_layer([bytes(bad)])


def test_duplicate_entries_in_one_layer_are_written_once() -> None:
    members, contents, _ = flatten(layer(("f", b"first"), ("f", b"second")))
    assert contents["f"] == b"first" and len(members) == 1


def _pax_layer(records: dict[str, str], name: str = "f", data: bytes = b"abc") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = records
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(512 - len(data)) + bytes(1024)


@pytest.mark.parametrize("size", ["notanumber", "-5", "1e3", " 3", "٣"])
def test_a_pax_size_that_is_not_a_number_is_refused(size: str) -> None:
    """#10.5: pax size=notanumber was an internal error (ValueError)."""
    with pytest.raises(LayerError, match="not a number"):
        Flattener(io.BytesIO().write).add_layer([_pax_layer({"size": size})])


def test_a_newer_file_below_an_older_symlink_makes_a_directory() -> None:
    """#10.11: a -> /etc in an older layer, a/passwd in a newer one: as Docker's overlay
    storage shows it, 'a' is a directory holding passwd; the old link is dropped, and said."""
    older = layer(("etc", None), ("etc/passwd", b"image's"), ("a", "->/etc"))
    newer = layer(("a/passwd", b"newer"))
    members, contents, flat = flatten(newer, older)
    assert contents["a/passwd"] == b"newer" and contents["etc/passwd"] == b"image's"
    assert "a" not in members or members["a"].isdir()
    assert any("'a'" in s for s in flat.skipped)
    # An older *directory* at that path still gives its metadata.
    members, _, flat = flatten(newer, layer(("a", None)))
    assert members["a"].isdir() and not flat.skipped
