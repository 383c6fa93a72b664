"""Temporaries beside an output: named before they exist, so an interrupt at any moment
leaves none behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsid.errors import OutputExistsError
from capsid.image import output


def test_an_interrupt_removes_every_temporary_of_the_process(tmp_path: Path) -> None:
    target = tmp_path / "out.sif"
    made = [output.Temporary(target, "sqfs"), output.Temporary(target, directory=True)]
    (made[1].path / "inside").write_text("x")
    kept = output.Temporary(target)
    os.replace(kept.path, target)
    kept.release()  # renamed into place: no longer the process's to remove
    output.discard_live()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.sif"]


def test_a_name_is_registered_before_the_file_is_made(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the file is being created (here: the open itself raising)."""
    real_open = os.open

    def interrupted(path: str, *args: object) -> int:
        real_open(path, *args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.Temporary(tmp_path / "out.sif")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()]  # the half-made temporary is there
    output.discard_live()
    assert not list(tmp_path.iterdir())


def test_a_name_left_by_an_earlier_process_of_the_same_pid_is_skipped(tmp_path: Path) -> None:
    first = output.Temporary(tmp_path / "x")
    number = int(first.path.name.split(".")[2].split("-")[1])  # .x.PID-N.capsid-tmp
    first.release()
    clash = tmp_path / f".x.{os.getpid()}-{number + 1}.capsid-tmp"
    clash.write_text("left")
    second = output.Temporary(tmp_path / "x")
    assert second.path != clash and clash.read_text() == "left"
    second.discard()


def _umasked(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def test_place_shares_a_private_file_and_copies_otherwise(tmp_path: Path) -> None:
    source = tmp_path / "made.sif"
    source.write_bytes(b"image")
    source.chmod(_umasked(0o755))
    old = os.umask(0o022)
    try:
        output.place(source, tmp_path / "shared.sif", share=True)
        assert (tmp_path / "shared.sif").stat().st_ino == source.stat().st_ino
        # a file with a second name already: a copy, so that the two outputs stay apart
        output.place(source, tmp_path / "copy.sif", share=True)
        assert (tmp_path / "copy.sif").stat().st_ino != source.stat().st_ino
        assert (tmp_path / "copy.sif").read_bytes() == b"image"
        # not asked to share
        (tmp_path / "shared.sif").unlink()
        output.place(source, tmp_path / "plain.sif")
        assert (tmp_path / "plain.sif").stat().st_ino != source.stat().st_ino
        # a umask that lets the group write: the copy gets that mode, the source stays private
        (tmp_path / "plain.sif").unlink()
        (tmp_path / "copy.sif").unlink()
        os.umask(0o002)
        output.place(source, tmp_path / "group.sif", share=True)
        st = (tmp_path / "group.sif").stat()
        assert st.st_ino != source.stat().st_ino and st.st_mode & 0o777 == 0o775
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(output.SUFFIX)]


def test_place_refuses_an_existing_target_without_force(tmp_path: Path) -> None:
    source, target = tmp_path / "made.sif", tmp_path / "out.sif"
    source.write_bytes(b"new")
    source.chmod(_umasked(0o777) & ~0o022)
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        output.place(source, target, share=True)
    assert target.read_bytes() == b"old"
    output.place(source, target, force=True, share=True)
    assert target.read_bytes() == b"new"


def test_place_copies_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system")
    source = tmp_path / "made.sif"
    source.write_bytes(b"image")
    source.chmod(_umasked(0o777) & ~0o022)
    target = shm / f"capsid-test-place-{os.getpid()}.sif"
    try:
        output.place(source, target, share=True)
        assert target.read_bytes() == b"image"
    finally:
        target.unlink(missing_ok=True)
