"""Temporaries beside an output: named before they exist, so an interrupt at any moment
leaves none behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
