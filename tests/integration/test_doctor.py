"""capsid doctor (#13): what an image needs against what the host offers, as text and as
JSON that validates against the schema in the package."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from capsid import doctor, elf
from tests.conftest import REPO, run_capsid

pytestmark = pytest.mark.unprivileged
SCHEMA = REPO / "src" / "capsid" / "schemas" / "doctor.schema.json"


def _validate(report: object) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))


def elf_needing(level: int) -> bytes:
    """A minimal 64-bit ELF whose GNU property note says it needs x86-64 *level* (1-4)."""
    header = bytearray(64)
    header[:8] = b"\x7fELF\x02\x01\x01\x00"
    struct.pack_into("<HHI", header, 16, 2, 0x3E, 1)  # ET_EXEC, x86-64, version
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, 56, 1)  # e_phentsize, e_phnum
    note = struct.pack("<III4sIII", 4, 16, 5, b"GNU\0", 0xC0008002, 4, 1 << (level - 1)) + \
        b"\0" * 4
    program = struct.pack("<IIQQQQQQ", 0x6474E553, 4, 120, 0, 0, len(note), len(note), 8)
    return bytes(header) + program + note


def test_isa_notes_are_read() -> None:
    assert [elf.isa_level(elf_needing(n)) for n in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert elf.isa_level(b"#!/bin/sh\n") == 0


@pytest.mark.parametrize("fixture", ["debian_sif", "busybox_sif", "mpi_sif"])
def test_report_for_real_images(fixture: str, request: pytest.FixtureRequest) -> None:
    image = request.getfixturevalue(fixture)
    text = run_capsid("doctor", image)
    assert text.returncode in (0, 1), text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "IMAGE", "/", "HOST"]
    assert all(line.split()[0] in ("OK", "WARN", "FAIL", "->") for line in lines[1:])
    result = run_capsid("doctor", "--json", image)
    report = json.loads(result.stdout)
    _validate(report)
    libc = report["image_side"]["libc"]
    assert libc == ("none" if fixture == "busybox_sif" else "glibc 2.36")
    mpi = report["image_side"]
    if fixture == "mpi_sif":  # Debian's Open MPI, with PMIx
        assert (mpi["mpi"], mpi["mpi_abi"], mpi["pmix"]) == ("Open MPI 4.1.4", "libmpi.so.40",
                                                             True)
        check = next(c for c in report["checks"] if c["check"] == "MPI")
        assert check["status"] == "OK" and check["host"] == "Open MPI 4.1.4 (libmpi.so.40)"
    else:
        assert mpi["mpi"] == "none"
    assert {c["check"] for c in report["checks"]} >= {"user namespaces", "/dev/fuse", "MPI",
                                                      "C library", "CPU ISA level", "PMIx"}


@pytest.fixture
def mpi_sandbox(tmp_path: Path) -> Path:
    """A sandbox with an old glibc, Open MPI 4.1.4 without PMIx and a binary needing v4."""
    root = tmp_path / "mpi"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (root / "usr/bin").mkdir()
    (lib / "libc.so.6").write_bytes(b"\x7fELF...GNU C Library (Debian GLIBC 2.28-10+deb10u1) "
                                    b"stable release version 2.28.\n")
    (lib / "libmpi.so.40").write_bytes(b"\x7fELF...\0Open MPI v4.1.4\0")
    (root / "usr/bin/solver").write_bytes(elf_needing(4))
    return root


def test_mismatches_are_failures_with_the_way_out(mpi_sandbox: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    host = doctor.Side(libc="glibc 2.36", mpi="MPICH 4.0", mpi_abi="libmpi.so.12", pmix=True,
                       isa="x86-64-v3")
    monkeypatch.setattr(doctor, "host_side", lambda: host)
    findings, image, _ = doctor.report(str(mpi_sandbox))
    assert (image.libc, image.mpi, image.mpi_abi, image.isa) == (
        "glibc 2.28", "Open MPI 4.1.4", "libmpi.so.40", "x86-64-v4")
    by = {f.check: f for f in findings}
    assert by["MPI"].status == "FAIL" and "ABI" in by["MPI"].fix
    assert by["CPU ISA level"].status == "FAIL" and "x86-64-v4" in by["CPU ISA level"].fix
    assert by["C library"].status == "WARN"
    assert by["PMIx"].status == "WARN" and "libpmix" in by["PMIx"].fix
    _validate(doctor.as_json(str(mpi_sandbox), findings, image, host))
    same = doctor.Side(libc="glibc 2.28", mpi="Open MPI 4.1.4", mpi_abi="libmpi.so.40",
                       isa="x86-64-v4")
    monkeypatch.setattr(doctor, "host_side", lambda: same)
    findings, _, _ = doctor.report(str(mpi_sandbox))
    assert {f.check: f.status for f in findings}["MPI"] == "OK"
    assert {f.check: f.status for f in findings}["CPU ISA level"] == "OK"


def test_doctor_exit_status_and_errors(mpi_sandbox: Path, tmp_path: Path) -> None:
    missing = run_capsid("doctor", tmp_path / "nope.sif")
    assert missing.returncode == 255 and missing.stderr.count("\n") == 1
    # on this host the sandbox's binary needs more than x86-64-v4 never; the exit status
    # follows the worst finding
    result = run_capsid("doctor", "--json", mpi_sandbox)
    report = json.loads(result.stdout)
    assert result.returncode == (1 if report["status"] == "FAIL" else 0)
