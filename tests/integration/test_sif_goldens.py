"""capsid reads the SIF library's golden images and Apptainer's images as the reference does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CAPSID, run_capsid


def _golden_cases(golang_sif: Path, kind: str) -> list[tuple[str, Path]]:
    base = golang_sif / "pkg" / "siftool" / "testdata" / kind
    return [(case.name, case / "out.golden") for case in sorted(base.iterdir())]


def _image_name(case: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"-\1", case).lower() + ".sif"


@pytest.mark.parametrize(("kind", "verb"), [("Test_command_getList", "list"),
                                            ("Test_command_getHeader", "header")])
def test_list_and_header_match_reference_listings(golang_sif: Path, kind: str,
                                                  verb: str) -> None:
    cases = _golden_cases(golang_sif, kind)
    assert len(cases) >= 5
    for case, golden in cases:
        image = golang_sif / "test" / "images" / _image_name(case)
        result = run_capsid("sif", verb, image, check=True)
        assert result.stdout == golden.read_text(), case


@pytest.mark.parametrize(("case", "object_id"), [("One", 1), ("Two", 2), ("Three", 3)])
def test_info_and_dump_match_reference(golang_sif: Path, case: str, object_id: int) -> None:
    image = golang_sif / "test" / "images" / "one-group-signed.sif"
    info = golang_sif / "pkg" / "siftool" / "testdata" / "Test_command_getInfo" / case
    assert run_capsid("sif", "info", object_id, image, check=True).stdout == \
        (info / "out.golden").read_text()
    dump = golang_sif / "pkg" / "siftool" / "testdata" / "Test_command_getDump" / case
    got = subprocess.run([str(CAPSID), "sif", "dump", str(object_id), str(image)],
                         capture_output=True, check=True).stdout
    assert got == (dump / "out.golden").read_bytes()


def _reference_listing(sifcheck: Path, image: Path) -> list[tuple[int, int, int, bool, int, int]]:
    out = subprocess.run([str(sifcheck), "list", str(image)], capture_output=True, text=True,
                         check=True).stdout
    rows = []
    for line in out.splitlines():
        i, g, link, is_group, off, size, _dtype, *_ = line.split(" ")
        rows.append((int(i), int(g), int(link), is_group == "true", int(off), int(size)))
    return rows


def _capsid_listing(image: Path) -> list[tuple[int, int, int, bool, int, int]]:
    out = run_capsid("sif", "list", image, check=True).stdout.splitlines()[3:]
    rows = []
    for line in out:
        cells = [c.strip() for c in line.split("|")]
        group = 0 if cells[1] == "NONE" else int(cells[1])
        link_text = cells[2]
        link = 0 if link_text == "NONE" else int(link_text.split()[0])
        start, end = map(int, cells[3].split("-"))
        rows.append((int(cells[0]), group, link, link_text.endswith("(G)"), start, end - start))
    return rows


def test_every_image_is_listed_as_the_reference_library_reads_it(
        golang_sif: Path, shared_sifs: Path, sifcheck: Path) -> None:
    images = sorted((golang_sif / "test" / "images").glob("*.sif")) + \
        sorted(shared_sifs.glob("*.sif"))
    assert len(images) >= 20
    for image in images:
        assert _capsid_listing(image) == _reference_listing(sifcheck, image), image.name


def test_apptainer_image_lists_all_its_objects(shared_sifs: Path) -> None:
    out = run_capsid("sif", "list", shared_sifs / "apptainer-busybox_amd64.sif",
                     check=True).stdout
    assert "|Def.FILE" in out and out.count("|JSON.Generic") == 2
    assert "|FS (Squashfs/*System/amd64)" in out and "|Signature (SHA-256)" in out
